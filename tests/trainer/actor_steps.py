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
from srpo_megatron.trainer import loop, rollouts, setup
from srpo_megatron.trainer.engines import start_engine
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
    setup.start_distributed(cfg)
    hf_config, tokenizer, dataset = setup.load_run_inputs(cfg)
    run = setup.build_run(cfg, hf_config, tokenizer, dataset, *start_engine(cfg, tokenizer))
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


def gradients_per_memory_setting_in_ranks(overrides: list[str], settings: dict[str, list[str]]):
    """One SRPO training pass of a fresh actor per setting (extra overrides: sequence parallelism,
    recompute), all from the same weights over the same micro-batches (odd length: padded under
    sequence parallelism), GRPO and SDPO rows alike. Returns on rank 0, per setting, the loss terms
    of each micro-batch and the full fp32 gradient."""
    from srpo_megatron.algorithms import LossBatch
    from srpo_megatron.trainer.actor import MegatronActor
    from srpo_megatron.trainer.batching import build_micro_batches
    from srpo_megatron.trainer.setup import load_model_config

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 8, 3, 6)]
    responses = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (8, 4, 9, 5)]
    out = {}
    for name, extra in settings.items():
        cfg = load_config(["configs/tiny_cpu.yaml"], [*overrides, *extra])
        actor = MegatronActor(cfg, load_model_config(cfg), optimizer_steps=1)
        mbs = build_micro_batches(prompts, responses, pad_id=0, token_budget=26)  # 2 x [2, 13]
        old = actor.forward(mbs, teacher=False, topk=cfg.algorithm.topk)
        teacher = actor.forward(mbs, teacher=True, gather_ids=[s.topk_ids for s in old], want_entropy=True)
        inputs = []
        for mb, o, t in zip(mbs, old, teacher, strict=True):
            # The teacher equals the student at the start: move its top-K mass about, so that the
            # SDPO term has a gradient (same generator seed in every setting).
            noise = torch.randn(t.gathered_logp.shape, generator=torch.Generator().manual_seed(1))
            mass = t.gathered_logp.logsumexp(-1, keepdim=True)
            old_logp = mb.to_response_layout(o.logp)
            inputs.append(
                LossBatch(
                    old_logp=old_logp,
                    rollout_logp=old_logp,
                    loss_mask=mb.response_mask.float(),
                    advantages=torch.tensor([1.0, -0.5]),
                    route_sdpo=torch.tensor([False, True]),
                    has_teacher=torch.tensor([False, True]),
                    fallback=torch.tensor([False, False]),
                    topk_ids=mb.to_response_layout(o.topk_ids),
                    teacher_topk_logp=mb.to_response_layout((t.gathered_logp + noise).log_softmax(-1) + mass),
                    teacher_entropy=mb.to_response_layout(t.entropy),
                    teacher_logp=mb.to_response_layout(t.logp),
                )
            )
        metrics = actor.train(mbs, inputs, weight_stats=None)
        losses = [(m["loss/grpo"], m["loss/sdpo"]) for m in metrics["micro_batches"]]
        out[name] = {"losses": losses, "grad": _gather_full(actor, lambda main: main.grad)}
    return out if dist.get_rank() == 0 else None
