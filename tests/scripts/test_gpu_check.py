"""scripts/gpu_check.sh, the first command on a lent GPU: on CPU it prints its JSON line with the
CUDA parts skipped, and every part runs at toy size (``--smoke``), so the device's one short call
does not find a plumbing bug."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("gpu_tests", "ops_memory", "megatron_step", "tiny_srpo", "activation_memory")


def _last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parts run for real")
def test_without_cuda_every_part_is_reported_skipped():
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    figures = _last_json_line(done.stdout)
    assert figures["device"] == "cpu"
    assert all(figures[p] == {"skipped": "no CUDA device"} for p in PARTS)


def test_every_part_runs_at_toy_size():
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = _last_json_line(done.stdout)
    assert not [p for p in PARTS if "error" in figures[p] or "skipped" in figures[p]], figures
    assert figures["gpu_tests"]["exit_code"] == 0
    assert figures["megatron_step"]["update_ok"] and figures["megatron_step"]["tokens_per_s"] > 0
    assert figures["ops_memory"]["fused_s"] > 0 and figures["ops_memory"]["naive_s"] > 0
    assert figures["tiny_srpo"]["grad_norm"] >= 0 and figures["tiny_srpo"]["logp_gap_max"] < 0.5
    modes = figures["activation_memory"]["modes"]
    assert [(m["mode"], m["sequence_parallel"]) for m in modes] == [("none", False), ("none", True)]
    assert all(m["measured_mib"] > 0 and m["predicted_mib"] > 0 for m in modes)
