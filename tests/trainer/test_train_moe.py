"""A tiny Qwen3-MoE trains through the real pipeline at expert parallelism 2 on 2 gloo processes
(4 experts per rank, data parallel 2): the EMA teacher's expert slices over their own group, the
per-expert weight sync into the HF engine, the router's auxiliary losses logged, checkpoint and
the HF export of the trained MoE policy."""

import json
import math

from tiny_training import train_in_ranks

from srpo_megatron.runtime.launch import run_distributed


def test_two_steps_at_expert_parallelism_2(tiny_run_inputs, tmp_path):
    root = tiny_run_inputs
    overrides = [
        f"model.hf_dir={root / 'moe'}",
        "model.tp=1",
        "model.ep=2",
        "model.moe_aux_loss_coeff=0.01",
        "model.moe_z_loss_coeff=0.001",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "ckpt.export_hf=true",
        "train.total_steps=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        f"log.output_dir={tmp_path}",
        "log.tensorboard=false",
    ]
    out, _ = run_distributed(
        train_in_ranks, world_size=2, megatron=False, args=(overrides, True), timeout=600
    )
    assert out["changed"] == out["total"], out["unchanged"]  # experts and router included
    assert out["export_gap"] < 1e-4  # the exported MoE policy gives the actor's log-probs
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["logp_gap_max"] < 1e-4  # the engine holds the actor's weights
        assert r["moe/load_balancing_loss"] > 0 and r["moe/z_loss"] > 0


def _unequal_passes_in_ranks(overrides: list[str]):
    """Rank 0 has teacher sequences, rank 1 none (and their sequences differ in length): both run the
    teacher's pass together (filler micro-batches on rank 1). Returns rank 0's teacher entropies."""
    import torch
    import torch.distributed as dist
    from tiny_training import build_tiny_run, first_step_rollouts

    from srpo_megatron.trainer import rollouts

    run = build_tiny_run(overrides)
    rows, batch, mine, routing, advantages = first_step_rollouts(run)
    needs = mine[:3] if dist.get_rank() == 0 else []
    siblings = torch.arange(len(batch))
    prefixes = rollouts.teacher_prefixes(batch, needs, siblings, run.tokenizer, rows, 256)
    step = rollouts.build_step_batch(
        batch, mine, routing, advantages, run.cfg.algorithm, dict(zip(needs, prefixes, strict=True)),
        pad_id=0, device=torch.device("cpu"),
    )  # fmt: skip
    rollouts.compute_old_logp(run.actor, step)
    rollouts.compute_teacher_stats(run.actor, step)
    return None if step.teacher is None else step.teacher_entropy[step.teacher_rows]


def test_expert_parallel_ranks_run_unequal_passes_together(tiny_run_inputs, tmp_path):
    """Without the agreed micro-batch plan rank 1 would skip the teacher's pass and rank 0 wait in
    its first token dispatch for good."""
    overrides = [
        f"model.hf_dir={tiny_run_inputs / 'moe'}",
        "model.tp=1",
        "model.ep=2",
        f"data.train_files=[{tiny_run_inputs / 'train.parquet'}]",
        "data.test_files=[]",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=4",
        "train.micro_batch_tokens=64",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        f"log.output_dir={tmp_path}",
        "log.tensorboard=false",
    ]
    entropy, nothing = run_distributed(
        _unequal_passes_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=300
    )
    assert nothing is None
    assert entropy.numel() > 0 and bool((entropy > 0).all())
