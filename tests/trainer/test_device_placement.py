"""Every tensor handed to the Megatron model, to a collective that is NCCL on GPUs, or mixed into a
device op is on the rank's device, and the loss function reads nothing back on the host: checked on
the CPU by ``device_check.DeviceAudit`` over whole tiny trainings (rollouts, the actor's passes,
evaluation, weight sync, checkpoint)."""

from types import SimpleNamespace

import pytest
import torch
from device_check import DeviceAudit, DeviceViolation
from megatron.core.pipeline_parallel import schedules
from tiny_training import parity_reward

from srpo_megatron.config import load_config
from srpo_megatron.runtime.launch import run_distributed


def test_the_audit_follows_host_tensors_and_raises_where_a_gpu_would():
    with DeviceAudit() as audit:
        host = torch.arange(4)
        device = torch.zeros(4, device="cpu")  # an explicit device: where get_device() points
        assert audit.is_host(host) and audit.is_host(host * 2) and not audit.is_host(device)
        assert not audit.is_host(host.to(device.device)) and audit.is_host(device.cpu())
        assert not audit.is_host(device + torch.tensor(1.0))  # a 0-dim host scalar is fine
        assert audit.is_host(torch.zeros(2, device=host.device)) and not audit.is_host(
            torch.ones_like(device)
        )
        with pytest.raises(DeviceViolation, match="mixes host tensors"):
            _ = device + host
        with pytest.raises(DeviceViolation, match="the Megatron model gets host tensors"):
            audit.check("the Megatron model", ([host], {}))
        with pytest.raises(DeviceViolation, match=r"torch.distributed.all_reduce \(NCCL on GPUs\) gets host"):
            torch.distributed.all_reduce(host)  # checked before it would need a process group

        def calc_loss(loss_func):  # as Megatron's schedule calls the loss function, on the last stage
            config = SimpleNamespace(calculate_per_token_loss=True, timers=None)
            store = []
            schedules.forward_step_calc_loss(
                None, device, loss_func, config, None, False, 1, store, cp_group_size=1, is_last_stage=True
            )
            return store

        assert calc_loss(lambda out: (out.sum(), out.sum().int(), {"n": 1})) == [{"n": 1}]
        with pytest.raises(
            DeviceViolation, match=r"the loss function reads a device tensor on the host \(__float__\)"
        ):
            calc_loss(lambda out: (out.sum(), out.sum().int(), {"n": float(out.sum())}))
        assert audit.checked == {"model": 0, "collective": 1, "loss": 2}


def audited_training_in_ranks(overrides: list[str]) -> dict[str, int]:
    from srpo_megatron.trainer import loop, rollouts

    rollouts.get_reward_fn = parity_reward
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    with DeviceAudit() as audit:
        loop.train(cfg)
    return audit.checked


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["model.tp=2"], id="tp2"),
        pytest.param(["model.tp=1", "model.pp=2"], id="pp2"),
        # the tiny MoE: routes recorded under sequence parallelism, and replayed at expert
        # parallelism with the ranks' agreed micro-batch plan
        pytest.param(
            ["moe", "model.tp=2", "model.sequence_parallel=true", "algorithm.routing_replay=old"],
            id="moe-tp2-sp-replay-old",
        ),
        pytest.param(
            ["moe", "model.tp=1", "model.ep=2", "algorithm.routing_replay=rollout"], id="moe-ep2-replay"
        ),
    ],
)
def test_a_tiny_run_keeps_its_data_on_the_device(tiny_run_inputs, tmp_path, layout):
    root = tiny_run_inputs
    model = "moe" if layout[0] == "moe" else "model"
    overrides = [
        f"model.hf_dir={root / model}",
        *layout[model == "moe" :],
        f"data.train_files=[{root / 'train.parquet'}]",
        f"data.test_files=[{root / 'test.parquet'}]",
        "eval.n_samples=2",
        "eval.max_prompts=4",
        "ckpt.export_hf=false",
        "train.total_steps=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "train.micro_batch_tokens=256",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        f"log.output_dir={tmp_path}",
        "log.tensorboard=false",
    ]
    checked = run_distributed(
        audited_training_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=600
    )
    last = checked[-1]  # the last pipeline stage runs the loss
    assert all(c["model"] > 0 and c["collective"] > 0 for c in checked), checked
    assert last["loss"] > 0, checked
