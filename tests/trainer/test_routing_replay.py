"""Routing replay on the tiny Qwen3-MoE (trainer/expert_routes.py), through the actor's own passes.

The HF engine records each token's experts; the Megatron student's live router agrees with them in
fp32 (``moe/route_flip`` 0), and ``old`` mode's pass records exactly those at every layout. Then
the recorded routes are replaced by random ones and replayed: the
student's log-probs equal those of the HF model forced to the same experts (so the replayed routers
chose exactly those, at every position and layer, at each layout), and ``moe/route_flip`` is the
share of decisions where the random routes differ from the live ones. The training pass replays
them under activation recomputation and a 1F1B pipeline too: its gradient equals the one without
recomputation.
"""

import dataclasses

import pytest
import torch
from tiny_training import build_tiny_run, first_step_rollouts

from srpo_megatron.runtime.launch import run_distributed


def _overrides(root, tmp_path, *extra: str) -> list[str]:
    return [
        f"model.hf_dir={root / 'moe'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=4",
        "train.micro_batch_tokens=96",  # several micro-batches per pass
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        "algorithm.routing_replay=rollout",
        f"log.output_dir={tmp_path}",
        "log.tensorboard=false",
        *extra,
    ]


def _random_routes(batch, num_experts: int, seed: int = 0) -> list[torch.Tensor]:
    """Per rollout, k distinct random experts wherever the engine recorded a choice (-1 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for recorded in batch.routed_experts:
        positions, layers, k = recorded.shape
        scores = torch.rand(positions, layers, num_experts, generator=g)
        chosen = scores.topk(k, dim=-1).indices.to(torch.int16)
        out.append(torch.where(recorded >= 0, chosen, recorded))
    return out


def _hf_forced(hf_dir: str, batch, routes: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The HF model with its routers forced to ``routes`` (softmax, the given k, renormalised: HF's
    routing at other experts), over every rollout of ``batch``: the log-probs of the responses'
    tokens in rollout order, and the share of recorded decisions where HF's own top-k (given the
    same forced history) differs from ``routes``."""
    from transformers import AutoModelForCausalLM

    from srpo_megatron.trainer.step_batch import Sequences

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    seqs = Sequences.build(batch.prompt_ids, batch.response_ids, 0, routes)
    forced = seqs.routes.long()  # [S, L, layers, k]
    recorded = forced[..., 0] >= 0  # [S, L, layers]
    forced = torch.where(forced >= 0, forced, torch.arange(forced.shape[-1]))
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    differ = torch.zeros_like(recorded)

    def force(layer):
        def hook(module, args, output):
            logits = output[0]  # [S * L, experts], batch-first
            chosen = forced[:, :, layer].reshape(-1, forced.shape[-1])
            live = logits.float().softmax(-1).topk(chosen.shape[-1], dim=-1).indices
            differ[:, :, layer] = (
                (live.sort(-1).values != chosen.sort(-1).values).any(-1).view(differ.shape[:2])
            )
            probs = logits.float().softmax(-1).gather(-1, chosen)
            if module.norm_topk_prob:
                probs = probs / probs.sum(-1, keepdim=True)
            return logits, probs.to(logits.dtype), chosen

        return hook

    handles = [gate.register_forward_hook(force(i)) for i, gate in enumerate(gates)]
    try:
        with torch.no_grad():
            logits = model(input_ids=seqs.tokens).logits
    finally:
        for h in handles:
            h.remove()
    logp = logits.log_softmax(-1)[seqs.seq, seqs.col, seqs.target]
    return logp, int((differ & recorded).sum()) / int(recorded.sum())


def _replay_in_ranks(overrides: list[str], train: bool):
    from megatron.core import parallel_state as ps

    from srpo_megatron.models.qwen3.config import Qwen3Arch
    from srpo_megatron.trainer import loop, rollouts

    run = build_tiny_run(overrides)
    _, batch, mine, routing, advantages = first_step_rollouts(run)
    actor, alg, dp_group = run.actor, run.cfg.algorithm, ps.get_data_parallel_group()

    def step_batch(mode: str = "rollout"):
        return rollouts.build_step_batch(
            batch, mine, routing, advantages, dataclasses.replace(alg, routing_replay=mode), {},
            pad_id=0, device=torch.device("cpu"),
            route_shape=actor.route_shape,
        )  # fmt: skip

    def reduced(metrics):
        sums = loop.MetricSums()
        sums.add(metrics)
        return sums.reduce(dp_group)

    out = {"last_stage": ps.is_pipeline_last_stage()}
    live = step_batch()
    out["flip_live"] = reduced(rollouts.compute_old_logp(actor, live, "rollout"))["moe/route_flip"]
    out["gap_live"] = (live.old_logp - live.rollout_logp).abs().max().item()
    # "old": the pass records the live choices (this stage's layers; the engine's, in fp32)
    old = step_batch("old")
    assert rollouts.compute_old_logp(actor, old, "old") == {}
    layers = [hook.layer for hook in actor.routes.hooks]
    engine = live.student.routes[:, :, layers]
    recorded = engine >= 0
    out["old_records_live"] = torch.equal(old.student.routes[:, :, layers][recorded], engine[recorded])
    out["old_recorded"] = int(recorded.sum())

    batch.routed_experts = _random_routes(batch, Qwen3Arch.from_hf(run.hf_config).num_experts)
    replayed = step_batch()
    out["flip_random"] = reduced(rollouts.compute_old_logp(actor, replayed, "rollout"))["moe/route_flip"]
    hf_logp, out["flip_expected"] = _hf_forced(run.cfg.model.hf_dir, batch, batch.routed_experts)
    if out["last_stage"]:
        span = slice(sum(len(r) for r in batch.response_ids[: mine[0]]), None)
        hf_mine = hf_logp[span][: replayed.old_logp.numel()]
        out["replay_vs_hf"] = (replayed.old_logp - hf_mine).abs().max().item()
        out["live_vs_replay"] = (replayed.old_logp - live.old_logp).abs().max().item()
    if train:
        mbs = actor.micro_batches(replayed.student)
        inputs = [replayed.loss_batch(mb.span) for mb in mbs] if out["last_stage"] else None
        update = actor.train(mbs, inputs, weight_stats=None, replay_routes=True)
        out["grad_norm"] = update.grad_norm
        out["micro_batches"] = len(mbs)
    return out


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["model.tp=1"], id="tp1"),
        pytest.param(["model.tp=2", "model.sequence_parallel=true"], id="tp2-sp"),
        pytest.param(["model.tp=1", "model.pp=2"], id="pp2"),
        pytest.param(["model.tp=1", "model.ep=2"], id="ep2"),
    ],
)
def test_replayed_forward_uses_exactly_the_given_experts(tiny_run_inputs, tmp_path, layout):
    world = 1 if layout == ["model.tp=1"] else 2
    per_rank = run_distributed(
        _replay_in_ranks,
        world_size=world,
        megatron=False,
        args=(_overrides(tiny_run_inputs, tmp_path, *layout), False),
        timeout=600,
    )
    for out in per_rank:
        assert out["flip_live"] == 0.0  # HF engine and Megatron's live router agree in fp32
        assert out["old_records_live"] and out["old_recorded"] > 0
        # the live router's other choices, given the replayed history at the layers before
        assert out["flip_random"] == pytest.approx(out["flip_expected"], abs=1e-12)
        assert out["flip_random"] > 0.5  # random routes: most decisions differ
        if out["last_stage"]:
            assert out["gap_live"] < 1e-4
            assert out["replay_vs_hf"] < 1e-4, out  # the forced HF model's log-probs
            assert out["live_vs_replay"] > 1e-2  # and replay changed them


def test_training_replay_under_recomputation_and_1f1b(tiny_run_inputs, tmp_path):
    """PP=2 with 1F1B (several micro-batches in flight): full recomputation's backward pass replays
    each micro-batch's own routes (the gradient equals the one without recomputation)."""
    grads = {}
    for recompute in ("none", "full"):
        extra = [
            "model.tp=1",
            "model.pp=2",
            "algorithm.variant=grpo",
            f"model.recompute_granularity={recompute}",
        ]
        if recompute == "full":
            extra += ["model.recompute_method=uniform", "model.recompute_num_layers=1"]
        per_rank = run_distributed(
            _replay_in_ranks,
            world_size=2,
            megatron=False,
            args=(_overrides(tiny_run_inputs, tmp_path / recompute, *extra), True),
            timeout=600,
        )
        assert all(out["micro_batches"] >= 3 for out in per_rank)
        grads[recompute] = per_rank[0]["grad_norm"]
    assert grads["full"] == pytest.approx(grads["none"], rel=1e-6)
