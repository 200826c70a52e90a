"""bf16 end to end as GPUs run it (bf16 parameters, fp32 main parameters and gradients in the
distributed optimizer, the fp32 EMA teacher), at TP=2 on 2 gloo processes: a run that dies after a
checkpoint resumes to exactly the numbers of an uninterrupted run."""

import json

import pytest
import torch
from actor_steps import train_until_a_crash_after_save
from tiny_training import train_in_ranks

from srpo_megatron.runtime.launch import run_distributed

COMPARED = ("reward_mean", "loss", "loss/grpo", "loss/sdpo", "grad_norm", "sdpo_fraction", "logp_gap_max")


def _overrides(root, out):
    return [
        f"model.hf_dir={root / 'model'}",
        "model.dtype=bfloat16",
        "model.tp=2",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "train.total_steps=4",
        "train.prompts_per_step=2",
        "train.mini_batch_prompts=2",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        "ckpt.save_every=2",
        "ckpt.export_hf=false",
        f"log.output_dir={out}",
        "log.tensorboard=false",
    ]


def _records(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_bf16_resume_is_exact(tiny_run_inputs, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_distributed(train_in_ranks, world_size=2, megatron=False, args=(_overrides(tiny_run_inputs, clean),))
    with pytest.raises(ChildProcessError, match="simulated crash after the step-2 checkpoint"):
        run_distributed(
            train_until_a_crash_after_save,
            world_size=2,
            megatron=False,
            args=(_overrides(tiny_run_inputs, crashed), 2),
        )
    assert sorted(_records(crashed)) == [1, 2]
    run_distributed(
        train_in_ranks, world_size=2, megatron=False, args=(_overrides(tiny_run_inputs, crashed),)
    )

    expected, resumed = _records(clean), _records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert all(expected[s]["update_ok"] == 1.0 for s in expected)
    for step in (3, 4):
        assert {k: resumed[step][k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}
    for rank in (0, 1):  # the fp32 EMA teacher ends bitwise equal
        name = f"checkpoints/step_000004/teacher_fp32/rank_{rank:05d}.pt"
        a, b = torch.load(clean / name), torch.load(crashed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
