"""Tiny trainings with ``rollout.engine=sglang`` against real SGLang 0.5.23 servers on the CPU
(the ``sglang`` tier: ``scripts/install.sh --sglang``): launched by the trainer, disaggregated and
colocated; at a URL (one server shared by the tier, ``conftest.sglang_server``) with PP=2, two runs
in a row, async rollouts killed and resumed; and an engine killed mid-run.

The one test left on the protocol stand-in (``srpo_megatron.testing.fake_sglang_server``) needs
``--enable-deterministic-inference``, which SGLang refuses on the CPU (its torch_native attention
is not batch-invariant: ``srt/arg_groups/overrides.py``); on GPUs the real server has it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny_training import ServerLog, start_killable_run, train_with_sglang_in_ranks

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import SGLangEngine
from srpo_megatron.runtime.launch import run_distributed

FAKE = "srpo_megatron.testing.fake_sglang_server"
REPO = Path(__file__).parents[2]
# engine vs actor log-probs of the sampled tokens, fp32 on both sides: measured 1e-7 to 5e-6 on
# this tiny random model (1.2e-4 to 1.9e-4 mean on the warmed-up tiny run); a wrong or missing
# weight sync is off by 1e-2 or more
GAP_MAX = 1e-3


def _overrides(root, out, *extra):
    return [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "rollout.engine=sglang",
        "rollout.startup_timeout_s=600",
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


def _records(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _server_processes(port: int) -> list[psutil.Process]:
    """Every process of a launched server: its leader names the port; its scheduler and
    detokenizer are the leader's children (``sglang::scheduler``)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if f"--port {port}" in " ".join(p.info["cmdline"] or []):
            found += [p, *p.children(recursive=True)]
    return found


def _launched_log(out: Path) -> Path:
    (log,) = (out / "sglang").glob("sglang_*.log")
    return log


def _port_of(log: Path) -> int:
    return int(re.search(r"sglang_(\d+)\.log", log.name).group(1))


def _launched_by_tp2(sglang_python) -> tuple[str, ...]:
    """A TP=2 trainer (2 gloo ranks) that launches one disaggregated engine on the CPU."""
    return ("model.tp=2", "rollout.mode=disaggregated", f"rollout.server_python={sglang_python}")


@pytest.mark.sglang
def test_engine_launched_on_the_cpu_trains_with_the_synced_weights(tiny_run_inputs, tmp_path, sglang_python):
    """The acceptance run: the trainer (TP=2, 2 gloo ranks) launches a real CPU server, broadcasts
    its weights into it over gloo before the first step and after every step, and samples from it:
    the server's log-probs of its own samples equal the actor's. The server goes with the run."""
    overrides = _overrides(tiny_run_inputs, tmp_path, *_launched_by_tp2(sglang_python), "train.total_steps=3")
    run_distributed(train_with_sglang_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=900)
    records = _records(tmp_path)
    assert sorted(records) == [1, 2, 3]
    for r in records.values():
        assert r["logp_gap_mean"] < GAP_MAX and r["logp_gap_max"] < 10 * GAP_MAX
        assert r["sync/bytes"] > 0
    log = ServerLog(_launched_log(tmp_path))
    routes = log.routes()
    buckets = routes.count("update_weights_from_distributed") // 4  # the start's sync, one per step
    assert buckets >= 2  # rollout.bucket_mb=1
    sync = [
        "begin_weight_update",
        *["update_weights_from_distributed"] * buckets,
        "end_weight_update",
        "flush_cache",
    ]
    first, last = "init_weights_update_group", "destroy_weights_update_group"
    assert routes == [first, *sync, *(["generate", *sync] * 3), last]
    assert len(log.joined_groups()) == 1 and log.joined_groups()[0].endswith("_pp0")
    assert _server_processes(_port_of(log.path)) == []  # stopped with the run, nothing left


@pytest.mark.sglang
def test_colocated_engine_launched_on_the_cpu_takes_weights_in_shared_memory(
    tiny_run_inputs, tmp_path, sglang_python
):
    """Colocated on the CPU: the engine runs without the memory saver (torch_memory_saver needs
    libcuda; there is no GPU memory to give back), and the trainer still releases and resumes its
    memory around every sync (SGLang's release ends in the device synchronise that
    ``rollout/sglang_cpu/sitecustomize.py`` sends to the CPU), and loads each bucket with
    ``update_weights_from_tensor`` (CPU tensors travel as shared-memory files)."""
    overrides = _overrides(
        tiny_run_inputs,
        tmp_path,
        "model.tp=1",
        "rollout.mode=colocated",
        f"rollout.server_python={sglang_python}",
    )
    run_distributed(train_with_sglang_in_ranks, world_size=1, megatron=False, args=(overrides,), timeout=900)
    records = _records(tmp_path)
    assert sorted(records) == [1, 2]
    assert all(r["logp_gap_max"] < 10 * GAP_MAX and r["sync/bytes"] > 0 for r in records.values())
    routes = ServerLog(_launched_log(tmp_path)).routes()
    loads = routes.count("update_weights_from_tensor") // 3  # the start's sync and one per step
    assert loads >= 2  # rollout.bucket_mb=1
    sync = [
        "resume_memory_occupation",
        "begin_weight_update",
        *["update_weights_from_tensor"] * loads,
        "end_weight_update",
        "flush_cache",
        "resume_memory_occupation",
    ]
    release = "release_memory_occupation"
    assert routes == [release, *sync, "generate", release, *sync, "generate", release, *sync]


@pytest.mark.sglang
def test_moe_at_expert_parallelism_2_replays_the_routes_sglang_returned(
    tiny_run_inputs, tmp_path, sglang_python
):
    """The tiny Qwen3-MoE at EP=2 (2 gloo ranks, 4 experts each) with ``routing_replay=rollout``: the
    trainer launches a CPU server with ``--enable-return-routed-experts`` and broadcasts the
    EP-sharded experts into it per expert, in buckets; the old-log-prob and training passes replay
    the experts SGLang returned. fp32 on both sides: Megatron's live router makes the decisions
    SGLang recorded (``moe/route_flip``), and the log-probs agree."""
    overrides = _overrides(
        tiny_run_inputs,
        tmp_path,
        f"model.hf_dir={tiny_run_inputs / 'moe'}",
        "model.tp=1",
        "model.ep=2",
        "algorithm.routing_replay=rollout",
        "rollout.mode=disaggregated",
        f"rollout.server_python={sglang_python}",
    )
    run_distributed(train_with_sglang_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=900)
    records = _records(tmp_path)
    assert sorted(records) == [1, 2]
    for r in records.values():
        assert r["moe/route_flip"] < 0.01  # a near-tie may round the other way
        assert r["logp_gap_mean"] < GAP_MAX and r["logp_gap_max"] < 10 * GAP_MAX
        assert r["sync/bytes"] > 0
    log = ServerLog(_launched_log(tmp_path))
    assert "'enable_return_routed_experts': True" in log.text()
    assert log.routes().count("update_weights_from_distributed") >= 3 * 2  # buckets per sync


def _hf_logp(hf_dir, prompt_ids, response_ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids, strict=True):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.sglang
def test_engine_at_a_url_takes_each_stage_from_its_own_source_rank_two_runs_in_a_row(
    tiny_run_inputs, tmp_path, sglang_server
):
    """PP=2 at ``rollout.engine_urls``: each stage's source rank broadcasts its own layers into the
    server, in a weight-update group of its own. A second run (a restart, a resume) joins the same
    server again under new group names. Afterwards the server holds the second run's trained
    weights: its log-probs of fresh samples equal those of the run's HF export."""
    log = ServerLog.from_now(sglang_server.log_path)
    for run, steps in (("first", 2), ("second", 1)):
        overrides = _overrides(
            tiny_run_inputs,
            tmp_path / run,
            "model.tp=1",
            "model.pp=2",
            "rollout.mode=disaggregated",
            f"rollout.engine_urls=[{sglang_server.url}]",
            "ckpt.export_hf=true",
            f"train.total_steps={steps}",
        )
        run_distributed(
            train_with_sglang_in_ranks, world_size=2, megatron=False, args=(overrides,), timeout=900
        )
        records = _records(tmp_path / run)
        assert sorted(records) == list(range(1, steps + 1))
        assert all(r["logp_gap_max"] < 10 * GAP_MAX for r in records.values())
    routes = log.routes()
    syncs = (1 + 2) + (1 + 1)  # each run: the start, then every step
    assert routes.count("begin_weight_update") == syncs
    # each run first ends any session a crashed run may have left open (refused: none is open)
    assert routes.count("end_weight_update") == syncs
    assert routes.count("update_weights_from_distributed") >= 2 * syncs  # both stages, every sync
    joins = log.joined_groups()  # one group per stage per run, names of the run's own
    assert len(set(joins)) == 4 and sorted({j.rsplit("_pp", 1)[1] for j in joins}) == ["0", "1"]
    assert routes.count("destroy_weights_update_group") == 4

    engine = SGLangEngine.connect(sglang_server.url, timeout_s=300)
    prompts = [[9707, 11, 1879], [785, 4226]]
    batch = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=3))
    engine.shutdown()
    served = torch.cat(batch.rollout_logp)
    assert (
        served - _hf_logp(tmp_path / "second" / "hf", batch.prompt_ids, batch.response_ids)
    ).abs().max() < GAP_MAX
    start = _hf_logp(tiny_run_inputs / "model", batch.prompt_ids, batch.response_ids)
    assert (served - start).abs().max() > 10 * GAP_MAX  # it did train (lr 5e-4)


def _sigkill_after_checkpoint_2(fn_name, overrides, out) -> dict[int, dict]:
    """Starts the run and SIGKILLs it (its whole process group) once the checkpoint of step 2
    exists; returns the metrics it had logged."""
    proc = start_killable_run(fn_name, overrides, world_size=1)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step_000002" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return _records(out)


@pytest.mark.sglang
def test_async_rollouts_killed_and_resumed_at_a_url(tiny_run_inputs, tmp_path, sglang_server):
    """train.async_rollouts at a shared server: step k+1's rollouts are generated while step k
    trains, so from step 2 each batch is one update stale (logged), and the TIS weight corrects a
    real engine-actor gap. The run is SIGKILLed after its checkpoint of step 2, which holds step 3's
    rollouts (sampled by v_1, which no checkpoint holds), and resumed: it trains on them.

    Not compared with an uninterrupted run: the CPU server cannot sample from per-request seeds
    (``--enable-deterministic-inference`` is refused there), so two runs sample differently from
    step 1 on. README, "SGLang on the CPU", gives the measured spread."""
    overrides = _resume_overrides(
        tiny_run_inputs,
        tmp_path,
        "rollout.mode=disaggregated",
        f"rollout.engine_urls=[{sglang_server.url}]",
        "train.async_rollouts=true",
    )
    killed = _sigkill_after_checkpoint_2("train_with_sglang_in_ranks", overrides, tmp_path)
    assert (tmp_path / "checkpoints" / "step_000002" / "rollouts_ahead.pt").is_file()
    _train(overrides)
    resumed = _records(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[1] == killed[1] and resumed[2] == killed[2]  # restored with the checkpoint
    assert [resumed[s]["rollout/policy_version"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert [resumed[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert resumed[1]["logp_gap_max"] < 10 * GAP_MAX  # v_0 sampled it and trains on it
    for s in (2, 3, 4):  # sampled by v_{s-2}, pi_old is v_{s-1}: lr 5e-4 moves the log-probs
        assert resumed[s]["logp_gap_max"] > 10 * GAP_MAX
        assert resumed[s]["is/tis_mean"] != 1.0


@pytest.mark.sglang
def test_an_engine_killed_mid_run_stops_the_run_with_one_line_and_leaves_no_process(
    tiny_run_inputs, tmp_path, sglang_python
):
    overrides = _overrides(
        tiny_run_inputs, tmp_path, *_launched_by_tp2(sglang_python), "train.total_steps=50"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "srpo_megatron.train", "--config", "configs/tiny_cpu.yaml", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "train.log", "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "metrics.jsonl").is_file() or not (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        log = _launched_log(tmp_path)
        server = _server_processes(_port_of(log))
        assert server
        for p in server:
            p.kill()
        start = time.monotonic()
        code = proc.wait(timeout=300)
        stopped_in = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "train.log").read_text()
    assert code != 0 and stopped_in < 120
    # one line from rank 0, naming the engine, the call and the server's log; no traceback of ours
    (ours,) = [line for line in text.splitlines() if line.startswith("srpo-train:")]
    assert re.match(rf"srpo-train: .*engine 'http://127\.0\.0\.1:{_port_of(log)}': \w+ failed: ", ours), ours
    assert f"(its log: {log})" in ours and "srpo_megatron/" not in text, text[-3000:]
    time.sleep(5)  # nothing of the run is left: trainer ranks, server, its scheduler
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == [] and _server_processes(_port_of(log)) == []


def _resume_overrides(root, out, *extra):
    """4 steps on one engine, a checkpoint after step 2 (the resume tests)."""
    return _overrides(
        root,
        out,
        "model.tp=1",
        "rollout.num_engines=1",
        "train.total_steps=4",
        "train.prompts_per_step=2",
        "ckpt.save_every=2",
        "ckpt.export_hf=false",
        *extra,
    )


def _train(overrides) -> None:
    run_distributed(train_with_sglang_in_ranks, world_size=1, megatron=False, args=(overrides,), timeout=900)


def test_sigkill_then_resume_on_deterministic_engines_matches_an_uninterrupted_run(tiny_run_inputs, tmp_path):
    """rollout.deterministic (GPU servers only; the stand-in samples each request from its seed as
    SGLang's deterministic mode does): the engines sample each request from its own seed, derived
    from (run seed, step, prompt, sample), so the fresh engines of a resumed run sample what the
    killed run's would have. Step by step, every compared metric equals the uninterrupted run's."""
    compared = ("reward_mean", "loss", "loss/grpo", "loss/sdpo", "grad_norm", "sdpo_fraction", "logp_gap_max")
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    stand_in = ("rollout.mode=colocated", "rollout.deterministic=true", f"rollout.server_module={FAKE}")
    _train(_resume_overrides(tiny_run_inputs, clean, *stand_in))
    killed = _sigkill_after_checkpoint_2(
        "train_with_sglang_in_ranks", _resume_overrides(tiny_run_inputs, crashed, *stand_in), crashed
    )
    assert max(killed) < 4
    _train(_resume_overrides(tiny_run_inputs, crashed, *stand_in))
    expected, resumed = _records(clean), _records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert {k: resumed[step][k] for k in compared} == {k: expected[step][k] for k in compared}, step
