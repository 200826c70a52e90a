import pytest
from tiny_training import make_tiny_inputs

from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
from srpo_megatron.runtime.distributed import find_free_port


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    make_tiny_inputs(root)
    return root


@pytest.fixture(scope="session")
def sglang_server(tiny_run_inputs, sglang_python, tmp_path_factory):
    """One real SGLang 0.5.23 server on the CPU serving the tiny model, shared by the ``sglang``
    tier (a start costs 30-90 s here). Tests push the weights they need, and read its log from
    where they started (``tiny_training.ServerLog``)."""
    spec = ServerSpec(
        str(tiny_run_inputs / "model"),
        port=find_free_port(),
        dtype="float32",
        python=sglang_python,
        device="cpu",
    )
    server = launch_server(spec, tmp_path_factory.mktemp("sglang_server"))
    try:
        wait_until_healthy([server], timeout_s=600)
        yield server
    finally:
        server.stop()
