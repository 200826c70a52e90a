"""Rank functions of the actor tests (a module of its own, so that spawned ranks can import it).

``train_steps_in_ranks`` runs real SRPO steps (HF engine on rank 0, parity reward, Megatron actor
with the distributed optimizer) through ``loop.train_step`` and returns, on rank 0, what the tests
compare: each step's metrics, the student's full fp32 gradient and main parameters (put together
from every data-parallel rank's optimizer shard), and the EMA teacher's compute weights.
"""

import torch
import torch.distributed as dist
from tiny_training import build_tiny_run

from srpo_megatron.config import load_config
from srpo_megatron.trainer import loop
from srpo_megatron.trainer.checkpoint import Checkpointer
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
    run = build_tiny_run(overrides)
    actor = run.actor
    initial = {n: p.detach().clone() for n, p in actor.student.named_parameters()}
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

    save = Checkpointer.save

    def save_then_crash(self, step):
        path = save(self, step)
        if step == crash_step:
            raise RuntimeError(f"simulated crash after the step-{step} checkpoint")
        return path

    Checkpointer.save = save_then_crash
    return train_in_ranks(overrides)


def gradients_per_memory_setting_in_ranks(overrides: list[str], settings: dict[str, list[str]]):
    """One SRPO training pass of a fresh actor per setting (extra overrides: sequence parallelism,
    recompute), all from the same weights over the same micro-batches (odd length: padded under
    sequence parallelism), GRPO and SDPO rows alike. Returns on rank 0, per setting, the loss terms
    of each micro-batch and the full fp32 gradient."""
    from srpo_megatron.trainer.actor import MegatronActor
    from srpo_megatron.trainer.rollouts import compute_old_logp, compute_teacher_stats
    from srpo_megatron.trainer.setup import load_model_config
    from srpo_megatron.trainer.step_batch import StepBatch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 8, 3, 6)]
    responses = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (8, 4, 9, 5)]
    sdpo = torch.tensor([False, True, False, True])  # each micro-batch: a GRPO and an SDPO rollout
    out = {}
    for name, extra in settings.items():
        cfg = load_config(["configs/tiny_cpu.yaml"], [*overrides, *extra, "train.micro_batch_tokens=26"])
        actor = MegatronActor(cfg, load_model_config(cfg), optimizer_steps=1)
        step = StepBatch.build(
            prompts,
            responses,
            rollout_logp=[torch.zeros(len(r)) for r in responses],
            advantages=torch.tensor([1.0, -0.5, 1.0, -0.5]),
            route_sdpo=sdpo,
            has_teacher=sdpo,
            fallback=torch.zeros(4, dtype=torch.bool),
            teacher_prefixes=dict(enumerate(prompts)),  # the teacher reads the student's own prompts
            topk=cfg.algorithm.topk,
            pad_id=0,
        )
        compute_old_logp(actor, step)
        compute_teacher_stats(actor, step)
        # The teacher equals the student at the start: move its top-K mass about, so that the SDPO
        # term has a gradient (same generator seed in every setting).
        teacher = step.teacher_topk_logp
        noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
        teacher.copy_((teacher + noise).log_softmax(-1) + teacher.logsumexp(-1, keepdim=True))
        step.rollout_logp.copy_(step.old_logp)
        mbs = actor.micro_batches(step.student)  # 2 x [2, 13] (14 under sequence parallelism)
        update = actor.train(mbs, [step.loss_batch(mb.span) for mb in mbs], weight_stats=None)
        losses = [(m["loss/grpo"].total.item(), m["loss/sdpo"].total.item()) for m in update.metrics]
        out[name] = {"losses": losses, "grad": _gather_full(actor, lambda main: main.grad)}
    return out if dist.get_rank() == 0 else None
