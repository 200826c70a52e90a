"""Reliability: the failures of issue 17, each replayed on a tiny run (2 gloo ranks, 2-3 steps).

- killing torchrun kills its ranks, and a second trainer on a run directory in use stops at once;
- a broken newest checkpoint (a truncated file, or a half-deleted checkpoint) is named, moved
  aside, and the run continues from the newest intact one, exactly;
- ``ckpt.resume=none`` on a directory holding a run is refused and changes nothing;
- a bad input is one line from rank 0, without a traceback.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_training import train_in_ranks

from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.trainer.checkpoint import verify_checkpoint

REPO = Path(__file__).parents[2]
COMPARED = ("reward_mean", "loss", "grad_norm", "sdpo_fraction", "logp_gap_max")


def _overrides(root: Path, out: Path, *more: str) -> list[str]:
    return [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "train.total_steps=3",
        "train.prompts_per_step=2",
        "train.mini_batch_prompts=2",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        "ckpt.save_every=1",
        "ckpt.keep_last=3",
        "ckpt.export_hf=false",
        f"log.output_dir={out}",
        "log.tensorboard=false",
        *more,
    ]


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(*args: str) -> list[str]:
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*runner, "-m", "srpo_megatron.train", "--config", "configs/tiny_cpu.yaml", *args]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_killing_torchrun_kills_its_ranks_and_a_second_trainer_stops_at_once(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        _torchrun(*_overrides(tiny_run_inputs, out, "train.total_steps=100000", "ckpt.save_every=0")),
        cwd=REPO,
        env=_ENV,
        start_new_session=True,  # its own process group, for killpg; the ranks make sessions of their own
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ranks = []
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never logged a step"
            time.sleep(0.2)
        ranks = psutil.Process(first.pid).children()
        assert len(ranks) == 2

        second = subprocess.run(
            _torchrun(*_overrides(tiny_run_inputs, out)),
            cwd=REPO,
            env=_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode != 0
        ours = [line for line in second.stderr.splitlines() if line.startswith("srpo-train:")]
        holder = f"(host {socket.gethostname()}, pid {ranks[0].pid}, since "
        assert len(ours) == 1 and "is in use by another trainer" in ours[0] and holder in ours[0], (
            second.stderr
        )
        assert "data:" not in second.stdout  # it stopped at start, before loading data or the model

        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(5)
        assert [r.pid for r in ranks if _alive(r)] == []
    finally:
        for rank in ranks:  # whatever the outcome, leave nothing running
            if _alive(rank):
                rank.kill()

    # the kernel dropped the lock with its holder, and the lines the killed run logged are gone:
    # a rerun (no checkpoint to resume from) logs each step once
    run_distributed(
        train_in_ranks,
        world_size=2,
        megatron=False,
        args=(_overrides(tiny_run_inputs, out, "train.total_steps=2"),),
    )
    assert [r["step"] for r in _steps(out)] == [1, 2]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def three_steps(tiny_run_inputs, tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("three_steps") / "run"
    run_distributed(train_in_ranks, world_size=2, megatron=False, args=(_overrides(tiny_run_inputs, out),))
    return out


@pytest.mark.parametrize("damage", ["truncated rng and trainer_state", "truncated shard and half-deleted"])
def test_a_broken_newest_checkpoint_is_named_and_the_run_continues_from_the_newest_intact_one(
    tiny_run_inputs, three_steps, tmp_path, capfd, damage
):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    ckpts = out / "checkpoints"
    step_2, step_3 = ckpts / "step_000002", ckpts / "step_000003"
    if damage == "truncated rng and trainer_state":
        expected = {step_3: "rng/rank_00001.pt has", step_2: "trainer_state.json has"}
        (step_3 / "rng" / "rank_00001.pt").write_bytes((step_3 / "rng" / "rank_00001.pt").read_bytes()[:100])
        (step_2 / "trainer_state.json").write_text((step_2 / "trainer_state.json").read_text()[:500])
    else:  # what a kill during the old deletion left: no metrics, no shard, the marker still there
        shard = sorted((step_3 / "model").glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
        (step_2 / "metrics.jsonl").unlink()
        removed = sorted((step_2 / "model").glob("*.distcp"))[-1]
        removed.unlink()
        expected = {step_3: f"model/{shard.name} has", step_2: "metrics.jsonl is missing"}
    capfd.readouterr()

    run_distributed(train_in_ranks, world_size=2, megatron=False, args=(_overrides(tiny_run_inputs, out),))

    printed = capfd.readouterr().out
    for path, what in expected.items():
        assert f"checkpoint {path} is broken: {what}" in printed
    assert f"continuing from {ckpts / 'step_000001'}, the newest intact checkpoint" in printed
    names = sorted(p.name for p in ckpts.iterdir())
    intact = [n for n in names if "." not in n]
    assert intact == ["step_000001", "step_000002", "step_000003"]
    assert all(verify_checkpoint(ckpts / n) is None for n in intact)
    assert [n.split(".broken-")[0] for n in names if n not in intact] == ["step_000002", "step_000003"]
    # each step logged once, in order, and the redone steps are the same steps
    resumed, clean = _steps(out), _steps(three_steps)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [{k: r[k] for k in COMPARED} for r in resumed] == [{k: r[k] for k in COMPARED} for r in clean]


def test_resume_none_on_a_run_is_refused_and_changes_nothing(tiny_run_inputs, three_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "trainer.lock"}
    with pytest.raises(
        ChildProcessError, match=r"ckpt.resume=none, but \S+ holds a run \(checkpoints step_000001"
    ):
        run_distributed(
            train_in_ranks,
            world_size=2,
            megatron=False,
            args=(_overrides(tiny_run_inputs, out, "ckpt.resume=none"),),
        )
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "trainer.lock"}
    assert after == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.tp=3",
            "srpo-train: config: model.tp x model.pp = 3 x 1 = 3 does not divide the world size 2 (processes launched by torchrun)",
        ),
        (
            "data.train_files=[{bad}]",
            "srpo-train: {bad}, row 1: no reward function for data_source 'chemistyr'",
        ),
    ],
)
def test_a_bad_input_is_one_line_from_rank_0(tiny_run_inputs, tmp_path, override, message):
    bad = tmp_path / "train.jsonl"
    row = {
        "data_source": "chemistyr",
        "prompt": [{"role": "user", "content": "q"}],
        "reward_model": {"ground_truth": "A"},
    }
    bad.write_text(json.dumps(row) + "\n")
    args = [*_overrides(tiny_run_inputs, tmp_path / "run"), override.format(bad=bad)]
    done = subprocess.run(_torchrun(*args), cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("srpo-train:")]
    assert len(ours) == 1 and ours[0].startswith(message.format(bad=bad)), done.stderr[-3000:]
    # torchrun's own summary of the exit codes (its one traceback) follows, but no rank printed one
    assert done.stderr.count("Traceback") <= 1 and "srpo_megatron/" not in done.stderr
