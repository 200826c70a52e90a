"""Tiny trainings with ``rollout.engine=sglang`` on CPU: the trainer launches, drives and stops
SGLang servers, here the protocol stand-in ``srpo_megatron.testing.fake_sglang_server`` (sglang
0.5.23's routes and weight-update protocol answered by the HF engine; it refuses generation and
weight loads while the memory they need is released). The real SGLang runs in ``gpu`` tests."""

import json
import os
import re
import signal
import time

import pytest
import torch
from tiny_training import start_killable_run, train_with_sglang_in_ranks

from srpo_megatron.rollout.sglang_engine import SGLangHTTPClient
from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
from srpo_megatron.rollout.weight_sync.verify import compare_checksums, weight_checksums
from srpo_megatron.runtime.distributed import find_free_port
from srpo_megatron.runtime.launch import run_distributed

FAKE = "srpo_megatron.testing.fake_sglang_server"


def _overrides(root, out, *extra):
    return [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "rollout.engine=sglang",
        f"rollout.server_module={FAKE}",
        "rollout.startup_timeout_s=300",
        "rollout.bucket_mb=1",
        "train.total_steps=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "train.micro_batch_tokens=256",
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        f"log.output_dir={out}",
        "log.tensorboard=false",
        *extra,
    ]


def _calls(log_path) -> list[str]:
    return [
        line.split(" ", 2)[1] + ("" if len(line.split(" ", 2)) < 3 else " " + line.split(" ", 2)[2])
        for line in log_path.read_text().splitlines()
        if line.startswith("CALL ")
    ]


def test_colocated_engines_launched_by_the_trainer(tiny_run_inputs, tmp_path):
    overrides = _overrides(
        tiny_run_inputs,
        tmp_path,
        "model.tp=2",
        "rollout.mode=colocated",
        "rollout.num_engines=2",
        "ckpt.export_hf=true",
    )
    metrics, _ = run_distributed(
        train_with_sglang_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=600
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # both engines sample with the trainer's weights, synced after every step
        assert r["logp_gap_max"] < 1e-4
        assert r["teacher_rollouts"] == round(r["sdpo_fraction"] * 16)  # 4 prompts x 4 samples
    logs = sorted((tmp_path / "sglang").glob("sglang_*.log"))
    assert len(logs) == 2
    for log in logs:
        calls = _calls(log)
        # memory off the GPUs until the first sync; every sync: weights back, the new ones loaded by
        # IPC in one session, caches flushed, the rest back; every step generates (the prompts split
        # over the two engines: 2 prompts x 4 samples each), then frees the GPUs for training
        release = "release_memory_occupation weights,kv_cache,cuda_graph"
        buckets = calls.index("end_weight_update ") - calls.index("begin_weight_update ") - 1
        assert buckets >= 2  # rollout.bucket_mb=1
        sync = [
            "resume_memory_occupation weights",
            "begin_weight_update ",
            *["update_weights_from_tensor "] * buckets,
            "end_weight_update ",
            "flush_cache ",
            "resume_memory_occupation kv_cache,cuda_graph",
        ]
        assert calls == [release, *sync] + ["generate 8 requests", release, *sync] * 2

    # the servers were stopped with the run, each holding exactly the trained weights
    trained = _checksums_of(tmp_path / "hf")
    for log in logs:
        port = int(re.search(r"sglang_(\d+)\.log", log.name).group(1))
        assert not SGLangHTTPClient(f"http://127.0.0.1:{port}").health()
        held = json.loads(log.read_text().split("CHECKSUMS ", 1)[1].splitlines()[0])
        assert compare_checksums(trained, {k: tuple(v) for k, v in held.items()}) == []
    assert compare_checksums(_checksums_of(tiny_run_inputs / "model"), trained) != []  # it did train


def _checksums_of(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return weight_checksums(model.named_parameters())


@pytest.fixture
def external_server(tiny_run_inputs, tmp_path):
    spec = ServerSpec(str(tiny_run_inputs / "model"), port=find_free_port(), dtype="float32", module=FAKE)
    server = launch_server(spec, tmp_path / "external")
    try:
        wait_until_healthy([server], timeout_s=300)
        yield server
    finally:
        server.stop()


def test_disaggregated_engine_at_a_url_receives_each_stage_from_its_own_source_rank(
    tiny_run_inputs, tmp_path, external_server
):
    """PP=2: each stage's source rank broadcasts its own layers to the engine, in a weight-update
    group of its own; after the run the engine holds exactly the trained weights (those of the
    run's HF export). A second run (a restart, a resume) then joins the same server again."""
    for run, steps in (("first", 2), ("second", 1)):
        overrides = _overrides(
            tiny_run_inputs,
            tmp_path / run,
            "model.tp=1",
            "model.pp=2",
            "rollout.mode=disaggregated",
            f"rollout.engine_urls=[{external_server.url}]",
            "ckpt.export_hf=true",
            f"train.total_steps={steps}",
        )
        run_distributed(
            train_with_sglang_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=600
        )
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert all(r["logp_gap_max"] < 1e-4 for r in records)
    calls = _calls(external_server.log_path)
    assert not any(c.startswith(("release", "resume", "update_weights_from_tensor")) for c in calls)
    syncs = (1 + 2) + (1 + 1)  # each run: the start, then every step
    assert sum(c.startswith("update_weights_from_distributed") for c in calls) >= 2 * syncs  # 2+ buckets
    # one session per sync; each run first ends any session a crashed run may have left open
    assert calls.count("begin_weight_update ") == syncs == calls.count("end_weight_update ") - 2
    # each run joined one group per stage once and left both at its end, under names of its own
    joins = [c.split()[1] for c in calls if c.startswith("init_weights_update_group")]
    leaves = [c.split()[1] for c in calls if c.startswith("destroy_weights_update_group")]
    assert len(set(joins)) == 4 and sorted(leaves) == sorted(joins)
    runs = {name.rsplit("_pp", 1)[0] for name in joins}
    assert len(runs) == 2 and sorted(joins) == sorted(f"{run}_pp{stage}" for run in runs for stage in (0, 1))
    # every sync: one session, inside which the buckets of both stages' groups arrive
    begin = calls.index("begin_weight_update ")
    session = calls[begin + 1 : calls.index("end_weight_update ", begin)]
    assert {c.split()[0] for c in session} == {"update_weights_from_distributed"}
    first_run = joins[0].rsplit("_pp", 1)[0]
    assert {c.split()[1] for c in session} == {f"{first_run}_pp0", f"{first_run}_pp1"}

    held = SGLangHTTPClient(external_server.url)._post("weights_checksums")
    held = {k: tuple(v) for k, v in held.items()}
    assert compare_checksums(_checksums_of(tmp_path / "second" / "hf"), held) == []
    assert compare_checksums(_checksums_of(tiny_run_inputs / "model"), held) != []  # it did train


def _resume_overrides(root, out, *extra):
    """4 steps on one deterministic engine, a checkpoint after step 2 (the resume tests)."""
    return _overrides(
        root,
        out,
        "model.tp=1",
        "rollout.num_engines=1",
        "rollout.deterministic=true",
        "train.total_steps=4",
        "train.prompts_per_step=2",
        "ckpt.save_every=2",
        "ckpt.export_hf=false",
        *extra,
    )


def _records(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _train(overrides) -> None:
    run_distributed(train_with_sglang_in_ranks, world_size=1, megatron=False, args=(overrides,), timeout=600)


def _sigkill_after_step_2_then_resume(overrides, out) -> None:
    """Starts the run, SIGKILLs it once the checkpoint of step 2 exists (before step 4 is logged),
    then resumes it to its end."""
    proc = start_killable_run("train_with_sglang_in_ranks", overrides, world_size=1)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_000002" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert max(_records(out)) < 4
    _train(overrides)


def test_sigkill_then_resume_on_deterministic_engines_matches_an_uninterrupted_run(tiny_run_inputs, tmp_path):
    """rollout.deterministic: the engines sample each request from its own seed, derived from (run
    seed, step, prompt, sample), so the fresh engines of a resumed run sample what the killed run's
    would have. Step by step, every compared metric is equal to the uninterrupted run's."""
    compared = ("reward_mean", "loss", "loss/grpo", "loss/sdpo", "grad_norm", "sdpo_fraction", "logp_gap_max")
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _train(_resume_overrides(tiny_run_inputs, clean, "rollout.mode=colocated"))
    _sigkill_after_step_2_then_resume(
        _resume_overrides(tiny_run_inputs, crashed, "rollout.mode=colocated"), crashed
    )
    expected, resumed = _records(clean), _records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert {k: resumed[step][k] for k in compared} == {k: expected[step][k] for k in compared}, step


def test_async_rollouts_one_update_stale_and_sigkill_then_resume_matches_uninterrupted(
    tiny_run_inputs, tmp_path
):
    """train.async_rollouts, one disaggregated engine launched by the trainer. Uninterrupted: step
    k+1's generation is requested before step k trains and is done before v_k is pushed, so each
    step from the second trains on rollouts of the weights one update older (staleness 1, logged),
    and the engine-actor gap the TIS weight corrects is real (a synchronous run's is fp32 noise,
    tests above). Killed and resumed: the checkpoint after step 2 holds step 3's rollouts (sampled
    by v_1, which no checkpoint holds); the resumed run trains on them, so every compared metric
    equals the uninterrupted run's, step by step, the version metrics and the gap included."""
    compared = (
        "reward_mean", "loss", "loss/grpo", "loss/sdpo", "grad_norm", "sdpo_fraction", "logp_gap_max",
        "is/tis_mean", "is/tis_capped_frac", "rollout/policy_version", "rollout/staleness",
    )  # fmt: skip
    ahead = ("rollout.mode=disaggregated", "train.async_rollouts=true")
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _train(_resume_overrides(tiny_run_inputs, clean, *ahead))
    expected = _records(clean)
    assert sorted(expected) == [1, 2, 3, 4]
    assert [expected[s]["rollout/policy_version"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert [expected[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert expected[1]["logp_gap_max"] < 1e-4  # v_0 sampled it and trains on it
    for s in (2, 3, 4):  # sampled by v_{s-2}, pi_old is v_{s-1}: lr 5e-4 moves the log-probs
        assert expected[s]["logp_gap_max"] > 1e-3
        assert expected[s]["is/tis_mean"] != 1.0
    # steps 1-3 waited for the next step's batch before their sync; the last submits none
    assert ["time/rollout_wait" in expected[s] for s in (1, 2, 3, 4)] == [True, True, True, False]
    # the start's sync; step 1 generates its batch, then submits step 2's before training; every
    # later generation is submitted after the sync of the step before (no update races one)
    (log,) = (clean / "sglang").glob("sglang_*.log")
    calls = [c.split()[0] for c in _calls(log) if c.startswith(("generate", "begin_weight_update"))]
    sync, generate = "begin_weight_update", "generate"
    assert calls == [sync, generate, generate, sync, generate, sync, generate, sync, sync]
    assert (clean / "checkpoints" / "step_000002" / "rollouts_ahead.pt").is_file()
    assert not (clean / "checkpoints" / "step_000004" / "rollouts_ahead.pt").exists()

    _sigkill_after_step_2_then_resume(_resume_overrides(tiny_run_inputs, crashed, *ahead), crashed)
    resumed = _records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert {k: resumed[step][k] for k in compared} == {k: expected[step][k] for k in compared}, step
