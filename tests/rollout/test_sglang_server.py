"""SGLang servers as the trainer launches and calls them, against the CPU protocol stand-in
(``srpo_megatron.testing.fake_sglang_server``): HTTP answers and refusals, start-up failures."""

import pytest
import torch
from tiny_qwen3 import tiny_qwen3_config

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import EngineError, SGLangEngine
from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
from srpo_megatron.rollout.weight_sync.broadcast import WeightSyncError
from srpo_megatron.runtime.distributed import find_free_port

FAKE = "srpo_megatron.testing.fake_sglang_server"


def test_command_carries_sglang_flags():
    spec = ServerSpec("/m", tp_size=4, base_gpu_id=4, port=30001, mem_fraction=0.5, memory_saver=True,
                      extra_args=("--disable-cuda-graph",))  # fmt: skip
    cmd = spec.command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--model-path"] == "/m" and flags["--tp-size"] == "4" and flags["--base-gpu-id"] == "4"
    assert flags["--mem-fraction-static"] == "0.5" and spec.url == "http://127.0.0.1:30001"
    assert cmd[-3:] == ["--skip-tokenizer-init", "--enable-memory-saver", "--disable-cuda-graph"]


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    spec = ServerSpec(
        str(tiny_model_dir), port=find_free_port(), dtype="float32", memory_saver=True, module=FAKE
    )
    server = launch_server(spec, tmp_path)
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


def test_http_engine_generates_and_reports_refusals(server):
    engine = SGLangEngine.connect(server.url, timeout_s=60)
    batch = engine.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=4, stop_token_ids=(5,)))
    assert batch.prompt_index == [0, 0, 1, 1]
    assert all(0 < len(r) <= 4 for r in batch.response_ids)
    assert all((lp <= 0).all() for lp in batch.rollout_logp)

    engine.release_memory()
    # a 400's body is the engine's reason, and it reaches the user
    with pytest.raises(EngineError, match="generate failed.*released"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(
        WeightSyncError, match="refused update_weights_from_tensor: memory \\['weights'\\] is released"
    ):
        engine.update_weights([("model.norm.weight", torch.ones(64))])
    engine.resume_memory(["weights"])
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors to a process not ours
    with pytest.raises(WeightSyncError, match="must run between begin_weight_update"):
        engine.update_weights([("model.norm.weight", torch.full((64,), 3.0))])
    engine.begin_weight_update()
    engine.update_weights([("model.norm.weight", torch.full((64,), 3.0))])
    with pytest.raises(WeightSyncError, match="shape"):  # the engine's own error message, passed on
        engine.update_weights([("model.norm.weight", torch.ones(2))])
    engine.end_weight_update()
    with pytest.raises(EngineError, match="not released"):
        engine.resume_memory(["weights"])
    engine.resume_memory(["kv_cache", "cuda_graph"])
    engine.flush_cache()  # a plain-text answer
    held = dict(engine.client._post("weights_checksums"))
    assert held["model.norm.weight"][0] == pytest.approx(192.0)  # 64 x 3.0 arrived by shared memory


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
