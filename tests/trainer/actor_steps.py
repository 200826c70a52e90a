"""Rank functions of the actor tests (a module of its own, so that spawned ranks can import it).

``train_steps_in_ranks`` runs real SRPO steps (HF engine on rank 0, parity reward, Megatron actor
with the distributed optimizer) through ``loop.train_step`` and returns, on rank 0, what the tests
compare: each step's metrics, the student's full fp32 gradient and main parameters (put together
from every data-parallel rank's optimizer shard), and the EMA teacher's compute weights.
"""

import torch
import torch.distributed as dist
from tiny_training import parity_reward

from srpo_megatron.config import load_config
from srpo_megatron.trainer import loop, rollouts
from srpo_megatron.trainer.teacher import iter_main_shards


def _gather_full(actor, pick) -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} from ``pick(main shard)`` of every rank's owned slices."""
    names = {param: name for name, param in actor.student.named_parameters()}
    shapes = {name: param.shape for name, param in actor.student.named_parameters()}
    mine = [
        (names[p], start, end, pick(main).detach().float().clone())
        for p, main, start, end in iter_main_shards(actor.optimizer)
    ]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full = {name: torch.full((shape.numel(),), float("nan")) for name, shape in shapes.items()}
    for pieces in everyone:
        for name, start, end, values in pieces:
            full[name][start:end] = values
    assert not any(t.isnan().any() for t in full.values()), "a slice no rank owns"
    return {name: full[name].view(shapes[name]) for name in full}


def train_steps_in_ranks(overrides: list[str], steps: int):
    rollouts.get_reward_fn = parity_reward
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    loop._start_distributed(cfg)
    hf_config, tokenizer, dataset = loop.load_run_inputs(cfg)
    run = loop._setup(cfg, hf_config, tokenizer, dataset, *loop.start_engine(cfg, tokenizer))
    actor = run.actor
    initial = {n: p.detach().clone() for n, p in actor.student.named_parameters()}
    run.weight_sync.sync(actor.student, run.hf_config)
    out = {"initial": initial, "metrics": [], "main": [], "teacher": []}
    for step in range(1, steps + 1):
        out["metrics"].append(loop.train_step(run, step))
        out["main"].append(_gather_full(actor, lambda main: main))
        with actor.teacher_on_device():
            out["teacher"].append({n: p.detach().clone() for n, p in actor.teacher.named_parameters()})
    out["grad"] = _gather_full(actor, lambda main: main.grad)  # the last update's
    return out if dist.get_rank() == 0 else None


def train_until_a_crash_after_save(overrides: list[str], crash_step: int):
    """A tiny training that dies right after its step-``crash_step`` checkpoint is complete."""
    from tiny_training import train_in_ranks

    save = loop.save_checkpoint

    def save_then_crash(cfg, step, *args, **kwargs):
        path = save(cfg, step, *args, **kwargs)
        if step == crash_step:
            raise RuntimeError(f"simulated crash after the step-{step} checkpoint")
        return path

    loop.save_checkpoint = save_then_crash
    return train_in_ranks(overrides)


def rollout_metrics_in_ranks(variants: list[str], rewards: list[float]) -> dict[str, dict]:
    """``StepRollouts.metrics`` of two prompts x two samples with these rewards, per variant."""
    from srpo_megatron.algorithms import AlgorithmConfig, route_rollouts
    from srpo_megatron.rollout.engine import RolloutBatch
    from srpo_megatron.trainer.rollouts import StepRollouts

    batch = RolloutBatch(
        prompt_index=[0, 0, 1, 1],
        prompt_ids=[[1, 2]] * 4,
        response_ids=[[3, 4], [5], [6, 7, 8], [9]],
        rollout_logp=[torch.zeros(2), torch.zeros(1), torch.zeros(3), torch.zeros(1)],
        finish_reasons=["stop", "length", "stop", "stop"],
    )
    ro = StepRollouts(batch, pad_id=0, token_budget=64, rewards=torch.tensor(rewards))
    out = {}
    for variant in variants:
        routing = route_rollouts(ro.rewards, ro.group_ids, AlgorithmConfig(variant=variant))
        out[variant] = ro.metrics(routing, variant, old=None, teacher=None)
    return out
