"""SGLang servers as the trainer launches and calls them, against the CPU protocol stand-in
(``srpo_megatron.testing.fake_sglang_server``), for the faults a real server cannot be made to give
on demand without a server start per fault: deaths mid-call, a server that dies at start or with
its launcher, a GPU server started without the memory saver. What a real server answers and refuses
is tested against one: ``tests/trainer/test_sglang_cpu_server.py``."""

import contextlib

import pytest
import torch
from tiny_qwen3 import tiny_qwen3_config

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import EngineError, SGLangEngine, serialize_tensors
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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config()
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


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
