"""Crash and resume: SIGKILL during a step, and during a checkpoint save, then ``ckpt.resume=auto``.

The killed runs are real process trees (a driver process running 2 gloo ranks) killed with SIGKILL
from outside, at a moment read off the checkpoint directory.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny_training import start_killable_run, train_in_ranks

from srpo_megatron.runtime.launch import run_distributed

COMPARED = ("reward_mean", "loss", "loss/grpo", "loss/sdpo", "grad_norm", "sdpo_fraction", "logp_gap_max")


def _overrides(root: Path, out: Path) -> list[str]:
    return [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "train.total_steps=4",
        "train.prompts_per_step=2",
        "train.mini_batch_prompts=2",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        "ckpt.save_every=2",
        "ckpt.keep_last=3",
        "ckpt.export_hf=false",
        f"log.output_dir={out}",
        "log.tensorboard=false",
    ]


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_sigkill_during_step_3_then_resume_matches_uninterrupted_run(tiny_run_inputs, tmp_path):
    root = tiny_run_inputs
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_distributed(
        train_in_ranks, world_size=2, megatron=False, args=(_overrides(root, clean),), timeout=600
    )

    proc = start_killable_run("train_in_ranks", _overrides(root, crashed), world_size=2)
    # step 2's checkpoint is complete: the run is now in step 3
    _kill_when(proc, lambda: (crashed / "checkpoints" / "step_000002" / "trainer_state.json").is_file())
    assert max(_records(crashed)) < 4

    run_distributed(
        train_in_ranks, world_size=2, megatron=False, args=(_overrides(root, crashed),), timeout=600
    )
    expected, resumed = _records(clean), _records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert {k: resumed[step][k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tiny_run_inputs, tmp_path):
    root, out = tiny_run_inputs, tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = start_killable_run("train_in_ranks", _overrides(root, out), world_size=2)
    _kill_when(proc, lambda: (ckpts / "step_000002").is_dir() and (ckpts / "step_000004.tmp").is_dir())
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004.tmp"]

    # the previous checkpoint loads: the run resumes from step 2 and finishes
    run_distributed(train_in_ranks, world_size=2, megatron=False, args=(_overrides(root, out),), timeout=600)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    assert sorted(_records(out)) == [1, 2, 3, 4]


def test_resume_in_another_layout_is_refused_with_a_clear_message(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    first = [
        o.replace("train.total_steps=4", "train.total_steps=1") for o in _overrides(tiny_run_inputs, out)
    ]
    run_distributed(train_in_ranks, world_size=2, megatron=False, args=(first,), timeout=600)  # TP=2
    other_layout = [*_overrides(tiny_run_inputs, out), "model.tp=1", "model.pp=2"]
    with pytest.raises(ChildProcessError, match="resuming training state across layouts is not supported"):
        run_distributed(train_in_ranks, world_size=2, megatron=False, args=(other_layout,), timeout=600)
