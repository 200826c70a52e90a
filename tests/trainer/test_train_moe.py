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
