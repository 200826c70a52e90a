"""Megatron model shards -> the stream of full HF-named tensors (the converter and weight sync).

``export_hf_tensors(model, hf_config)`` walks this rank's parameters in HF order (embedding,
layers ascending, final norm, lm_head). TP-sharded parameters are all-gathered over the TP group,
then un-fused (QKV per query group -> q/k/v; linear_fc1 -> gate/up) and stripped of vocabulary
padding. A MoE layer's experts are spread over the expert-parallel (EP) group: they come out one
expert at a time, in expert order, each broadcast from the EP rank that holds it (then gathered
over the experts' TP group), so that no rank ever holds more than its own experts plus one.

Who iterates: every rank of one copy of the model, since the gathers and broadcasts are
collectives. That is the model-parallel group of data-parallel rank 0 and, at EP > 1, the other
data-parallel ranks of its EP group (they hold the other experts): the ranks where
``is_exporting_rank()``. Each of them must iterate to the end. Ranks of other copies may iterate
too (their own collectives, among themselves) or not at all.

Who gets what:
- the tensors of a PP stage come out on that stage's TP rank 0 of EP rank 0 (= data-parallel
  rank 0), each exactly once;
- every other rank yields nothing (it still takes part in the collectives), unless
  ``every_tp_rank=True``: then every rank yields its own copy of every tensor of its stage
  (colocated engines read each GPU's copy in place);
- PP stages run independently (no cross-stage communication): a consumer that needs the whole
  model on one rank (weight sync to a single engine) broadcasts from the owning stages.
- tied embeddings: ``lm_head.weight`` is not exported (HF ties it to ``embed_tokens``); the last
  stage's copy of the embedding is skipped.

One tensor is materialised at a time (two or three for the fused QKV / gate-up); buckets are the
consumer's choice. Tensors stay on the parameters' device, in the parameters' dtype; replicated
ones (norms, routers) and a rank's own experts at EP = TP = 1 are the parameters themselves,
detached: copy them if you keep them across an update.
"""

import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.mapping import (
    GATE_UP,
    ParamMap,
    expert_param_map,
    is_tp_sharded,
    map_params,
    merge_shards,
)


def is_exporting_rank() -> bool:
    """True on the ranks that must iterate ``export_hf_tensors`` for one copy of the model (see
    the module docstring): expert-data-parallel rank 0. At EP = 1 that is data-parallel rank 0
    (with context parallelism: of the data x context group)."""
    from megatron.core import parallel_state

    return parallel_state.get_expert_data_parallel_rank() == 0


def export_hf_tensors(
    model: torch.nn.Module, hf_config: dict[str, Any] | Any, *, every_tp_rank: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for this PP stage on its TP rank 0 of EP rank 0, or on
    every rank (see module docstring).

    model: this rank's bare GPTModel stage (unwrap DDP / Float16Module first).
    """
    from megatron.core import parallel_state as ps

    arch = Qwen3Arch.from_hf(hf_config)
    is_producer = every_tp_rank or (
        ps.get_tensor_model_parallel_rank() == 0 and ps.get_expert_model_parallel_rank() == 0
    )
    params = dict(model.named_parameters())
    gather_tp = _TPGather(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size())
    gather_expert_tp = _TPGather(
        ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
    )
    # consecutive parameters of one layer's experts together; every other parameter on its own
    for (_, experts), group in itertools.groupby(
        map_params(model), key=lambda pm: (pm.layer, pm.expert is not None)
    ):
        if experts:
            for pm, local in _experts_of_layer(list(group), params):
                shards = gather_expert_tp(pm, local)
                if is_producer:
                    yield from merge_shards(pm, shards, arch)
            continue
        for pm in group:
            if pm.tied_copy:
                continue
            shards = gather_tp(pm, params[pm.mcore_name].detach())
            if is_producer:
                yield from merge_shards(pm, shards, arch)
            del shards


class _TPGather:
    """The shards of a parameter from every rank of a tensor-parallel group, in rank order."""

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group, self.size = group, size

    def __call__(self, pm: ParamMap, local: torch.Tensor) -> list[torch.Tensor]:
        if not is_tp_sharded(pm) or self.size == 1:
            return [local]
        shards = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(shards, local.contiguous(), group=self.group)
        return shards


def _experts_of_layer(
    maps: list[ParamMap], params: dict[str, torch.nn.Parameter]
) -> Iterator[tuple[ParamMap, torch.Tensor]]:
    """Every expert of one MoE layer, in global expert order: ``(ParamMap, this rank's TP shard)``
    of its linear_fc1 then linear_fc2. ``maps``: this rank's expert parameters of that layer.

    Expert e lives on EP rank e // (E/ep) as its local expert e % (E/ep); the owner broadcasts it
    over the EP group, into a buffer on the other ranks (one expert's shard at a time). Every EP
    rank holds the same number of local experts with the same shapes, so every rank takes part
    in the same broadcasts in the same order.
    """
    from megatron.core import parallel_state as ps

    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    ep_group = ps.get_expert_model_parallel_group()
    local = {(pm.expert, pm.kind == GATE_UP): pm for pm in maps}  # (global expert, is fc1) -> map
    first = min(pm.expert for pm in maps)  # this rank's first expert: ep_rank * num_local
    num_local = len(local) // 2
    assert first == ep_rank * num_local and len(maps) == 2 * num_local, "experts are not split evenly over EP"
    layer = maps[0].layer
    for expert in range(ep * num_local):
        owner, index = divmod(expert, num_local)
        for is_fc1 in (True, False):
            own = local[(first + index, is_fc1)]  # this rank's local expert at the same position
            tensor = params[own.mcore_name].detach()
            if ep > 1:
                tensor = tensor.contiguous() if owner == ep_rank else torch.empty_like(tensor)
                dist.broadcast(tensor, src=dist.get_global_rank(ep_group, owner), group=ep_group)
            yield expert_param_map(own.mcore_name, layer, expert, 1 if is_fc1 else 2), tensor
            del tensor
