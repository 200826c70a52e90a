"""The engines and the weight transports implement the interfaces the trainer calls them through
(``RolloutEngine``, ``WeightSync``): every method of the protocol, with its parameters and defaults.
Nothing else checks this: the trainer holds them by the protocol's type and calls no other method."""

import inspect

import pytest

from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.weight_sync import WeightSync
from srpo_megatron.rollout.weight_sync.broadcast import BroadcastWeightSync
from srpo_megatron.rollout.weight_sync.cuda_ipc import CudaIpcWeightSync
from srpo_megatron.rollout.weight_sync.in_process import InProcessWeightSync


def _signature(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def _methods(protocol) -> dict:
    return {
        name: f for name, f in vars(protocol).items() if inspect.isfunction(f) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    "protocol, implementation",
    [
        (RolloutEngine, HFEngine),
        (RolloutEngine, SGLangFleet),
        (WeightSync, InProcessWeightSync),
        (WeightSync, BroadcastWeightSync),
        (WeightSync, CudaIpcWeightSync),
    ],
)
def test_implementation_has_every_method_of_its_protocol(protocol, implementation):
    methods = _methods(protocol)
    assert methods, protocol
    for name, method in methods.items():
        assert _signature(getattr(implementation, name)) == _signature(method), (implementation, name)
