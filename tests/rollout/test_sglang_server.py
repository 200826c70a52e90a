"""SGLang servers as the trainer launches and calls them, against the CPU protocol stand-in
(``srpo_megatron.testing.fake_sglang_server``): HTTP answers, refusals and deaths, start-up
failures."""

import contextlib

import pytest
import torch
from tiny_qwen3 import tiny_qwen3_config

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import EngineError, SGLangEngine, WeightSyncError, serialize_tensors
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
from srpo_megatron.runtime.distributed import find_free_port

FAKE = "srpo_megatron.testing.fake_sglang_server"


def test_command_carries_sglang_flags():
    spec = ServerSpec("/m", tp_size=4, base_gpu_id=4, port=30001, mem_fraction=0.5, memory_saver=True,
                      deterministic=True, extra_args=("--cuda-graph-backend-decode=disabled",))  # fmt: skip
    cmd = spec.command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--model-path"] == "/m" and flags["--tp-size"] == "4" and flags["--base-gpu-id"] == "4"
    assert flags["--mem-fraction-static"] == "0.5" and spec.url == "http://127.0.0.1:30001"
    assert cmd[-4:] == [
        "--skip-tokenizer-init",
        "--enable-memory-saver",
        "--enable-deterministic-inference",
        "--cuda-graph-backend-decode=disabled",
    ]


@contextlib.contextmanager
def running_server(model_dir, log_dir, memory_saver=True):
    spec = ServerSpec(
        str(model_dir), port=find_free_port(), dtype="float32", memory_saver=memory_saver, module=FAKE
    )
    server = launch_server(spec, log_dir)
    try:
        wait_until_healthy([server], timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config()
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def test_http_engine_generates_and_reports_refusals(server):
    engine = SGLangEngine.connect(server.url, timeout_s=60)
    batch = engine.generate(
        [[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=4, stop_token_ids=(5,), seed=0)
    )
    assert batch.prompt_index == [0, 0, 1, 1]
    assert all(0 < len(r) <= 4 for r in batch.response_ids)
    assert all((lp <= 0).all() for lp in batch.rollout_logp)
    assert engine.server_info()["enable_memory_saver"] is True

    # as SGLang: unknown top-level fields are ignored, unknown sampling parameters refused, a
    # missing required field is FastAPI's 422
    client = engine.client
    out = client.generate(input_ids=[[1]], sampling_params={"max_new_tokens": 1}, return_logprob=True, typo=1)
    assert len(out) == 1
    with pytest.raises(EngineError, match="HTTP 400: .*unknown field `seed`"):
        client.generate(input_ids=[[1]], sampling_params={"seed": 1}, return_logprob=True)
    with pytest.raises(EngineError, match="HTTP 422: .*'master_port'"):
        client.init_weights_update_group(master_address="127.0.0.1", rank_offset=1, world_size=2)

    engine.release_memory()
    engine.resume_memory(["weights"])
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors to a process not ours
    norm = [("model.norm.weight", torch.full((64,), 3.0))]
    with pytest.raises(WeightSyncError, match="must run between begin_weight_update"):
        engine.update_weights_serialized([serialize_tensors(norm)])
    engine.begin_weight_update()
    with pytest.raises(WeightSyncError, match="already open"):
        engine.begin_weight_update()
    engine.update_weights_serialized([serialize_tensors(norm)])
    engine.end_weight_update()
    engine.resume_memory(["kv_cache", "cuda_graph"])
    engine.flush_cache()  # a plain-text answer
    held = dict(client._post("weights_checksums"))
    assert held["model.norm.weight"][0] == pytest.approx(192.0)  # 64 x 3.0 arrived by shared memory


def _wrong_shape_load(engine):
    engine.begin_weight_update()
    engine.update_weights_serialized([serialize_tensors([("model.norm.weight", torch.ones(2))])])


def _resume_never_released(engine):
    engine.resume_memory(["weights"])


def _generate_while_released(engine):
    engine.release_memory()
    engine.generate([[1]], SamplingParams(seed=0))


@pytest.mark.parametrize(
    "act, call, reason",
    [
        (_wrong_shape_load, "update_weights_from_tensor", "load_weights raised"),
        (_resume_never_released, "resume_memory_occupation", "were not released"),
        (_generate_while_released, "generate", "touched released memory"),
    ],
)
def test_server_dies_where_sglang_does_and_the_caller_gets_one_clear_error(
    tiny_model_dir, tmp_path, act, call, reason
):
    """SGLang's scheduler raises on these, dies, and the server with it: no 400, no answer at all.
    The caller must get an error naming the engine and the call at once, and clean-up calls to the
    dead server must not hang."""
    import time

    with running_server(tiny_model_dir, tmp_path) as server:
        engine = SGLangEngine.connect(server.url, timeout_s=60)
        torch.multiprocessing.set_sharing_strategy("file_system")
        start = time.monotonic()
        with pytest.raises(
            Exception, match=f"engine '{server.url}': {call} failed: the server closed the connection"
        ):
            act(engine)
        fleet = SGLangFleet([engine], colocated=True)
        fleet.end_weight_update(flush=False, quiet=True)  # the clean-up after a failed load
        assert time.monotonic() - start < 30
        assert server.process.wait(timeout=30) == 1
        assert f"DIED {call}: " in server.log_path.read_text() and reason in server.log_path.read_text()


def test_server_without_memory_saver_releases_nothing_and_colocated_runs_refuse_it(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, tmp_path, memory_saver=False) as server:
        engine = SGLangEngine.connect(server.url, timeout_s=60)
        engine.release_memory()  # succeeds and frees nothing, as in SGLang
        assert len(engine.generate([[1]], SamplingParams(max_new_tokens=2, seed=0))) == 1
        fleet = SGLangFleet([engine], colocated=True)
        with pytest.raises(
            EngineError, match="enable_memory_saver=False: start it with --enable-memory-saver"
        ):
            fleet.connect()


def test_server_that_dies_at_start_is_an_error_with_its_log(tmp_path):
    spec = ServerSpec(str(tmp_path / "no_such_model"), port=find_free_port(), dtype="float32", module=FAKE)
    server = launch_server(spec, tmp_path)
    with pytest.raises(EngineError, match=r"(?s)exited with code 1 while starting.*no_such_model"):
        wait_until_healthy([server], timeout_s=120)


def test_server_dies_with_the_process_that_launched_it(tiny_model_dir, tmp_path):
    """A trainer killed without stopping its servers (SIGKILL, os._exit) must not leave them behind."""
    import subprocess
    import sys
    import time

    port = find_free_port()
    script = (
        "import os, pathlib\n"
        "from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy\n"
        f"spec = ServerSpec({str(tiny_model_dir)!r}, port={port}, dtype='float32', module={FAKE!r})\n"
        f"wait_until_healthy([launch_server(spec, pathlib.Path({str(tmp_path)!r}))], 300)\n"
        "os._exit(3)  # no clean-up of any kind\n"
    )
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 3
    client = SGLangEngine.connect(f"http://127.0.0.1:{port}").client
    deadline = time.monotonic() + 30
    while client.health() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not client.health()
