"""SGLang servers as child processes of the trainer: ``python -m sglang.launch_server`` per engine.

A server is its own process tree (tokenizer manager, one scheduler per TP rank), so engines never
share the trainer's event loop or CUDA context, any trainer rank can reach any engine over HTTP,
and a crashed engine is a dead process with a log, not a hung call. The flags are sglang 0.5.23's
(``srt/arg_groups/fields``: ``--model-path``, ``--tp-size``, ``--base-gpu-id``,
``--mem-fraction-static``, ``--enable-memory-saver``, ``--skip-tokenizer-init``, ...).

    server = launch_server(ServerSpec(model_path, tp_size=4, base_gpu_id=0, port=30000), log_dir)
    wait_until_healthy([server], timeout_s=900)
    ... SGLangEngine.connect(server.url, tp_size=4) ...
    server.stop()

On a machine without CUDA the server runs on the CPU (``ServerSpec(device="cpu")``): SGLang's CPU
engine (``SGLANG_USE_CPU_ENGINE=1``) with plain-torch attention and sampling, no CUDA graphs, a
KV cache of ``CPU_MAX_TOTAL_TOKENS`` (SGLang would size it from the machine's RAM otherwise), a
scheduler that sleeps when idle instead of spinning on a core the trainer needs, and
``sglang_cpu/`` first on its ``PYTHONPATH``: work-arounds for the CUDA builds of PyPI's torch, sgl_kernel
and SGLang's host memory, each file naming what it works around. ``python``: the interpreter of an
environment that has sglang (it pins its own transformers; ``scripts/install.sh --sglang`` makes
``.venv-sglang``).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from srpo_megatron.rollout.sglang_engine import EngineError, SGLangHTTPClient
from srpo_megatron.runtime.distributed import child_process_env

CPU_SHIMS = Path(__file__).parent / "sglang_cpu"
CPU_MAX_TOTAL_TOKENS = 32768
CPU_FLAGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    "--skip-server-warmup",
    "--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS),
    # an idle scheduler otherwise spins a core at 100% (``scheduler_components/idle_sleeper.py``):
    # on a CPU machine that core is the trainer's
    "--sleep-on-idle",
)  # fmt: skip


@dataclass(frozen=True)
class ServerSpec:
    model_path: str
    tp_size: int = 1
    base_gpu_id: int = 0
    port: int = 30000
    host: str = "127.0.0.1"
    mem_fraction: float = 0.6
    memory_saver: bool = False
    """``--enable-memory-saver``: needed to release / resume memory (colocated engines)."""
    deterministic: bool = False
    """``--enable-deterministic-inference``: batch-invariant kernels, and the only mode in which
    SGLang samples with each request's ``sampling_seed``."""
    dtype: str = "bfloat16"
    routed_experts: bool = False
    """``--enable-return-routed-experts``: requests may ask for each token's experts (routing replay)."""
    extra_args: tuple[str, ...] = ()
    """Further ``launch_server`` flags, as given (e.g. ``("--cuda-graph-backend-decode=disabled",)``)."""
    module: str = "sglang.launch_server"
    python: str = sys.executable
    """The interpreter that runs the server (an environment with sglang)."""
    device: str = "cuda"
    """``cuda`` or ``cpu`` (module docstring)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", self.module,
            "--model-path", self.model_path,
            "--tp-size", str(self.tp_size),
            "--base-gpu-id", str(self.base_gpu_id),
            "--host", self.host,
            "--port", str(self.port),
            "--mem-fraction-static", str(self.mem_fraction),
            "--dtype", self.dtype,
            "--skip-tokenizer-init",
        ]  # fmt: skip
        if self.memory_saver:
            cmd.append("--enable-memory-saver")
        if self.deterministic:
            cmd.append("--enable-deterministic-inference")
        if self.routed_experts:
            cmd.append("--enable-return-routed-experts")
        if self.device == "cpu":
            cmd += CPU_FLAGS
        return cmd + list(self.extra_args)  # last: a flag given twice takes its last value

    def env(self) -> dict[str, str]:
        """The launcher's variables left out (the server builds its own process groups)."""
        env = child_process_env()
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CPU_SHIMS), env.get("PYTHONPATH")]))
        return env


@dataclass
class ServerProcess:
    spec: ServerSpec
    process: subprocess.Popen
    log_path: Path
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return self.spec.url

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's whole process group (its schedulers too), then SIGKILL to whatever
        of it is left after timeout_s (or at once, when the leader is already gone)."""
        if self.stopped:
            return
        self.stopped = True
        _signal_group(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout_s)
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing of the group is left
        os.killpg(pgid, sig)


def launch_server(spec: ServerSpec, log_dir: Path) -> ServerProcess:
    """Start one server (returns at once; see ``wait_until_healthy``). Output goes to
    ``<log_dir>/sglang_<port>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"sglang_{spec.port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            spec.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=spec.env(),
            start_new_session=True,  # its own process group: stop() signals the whole server
            preexec_fn=_die_with_parent,
        )
    return ServerProcess(spec, process, log_path)


if sys.platform == "linux":
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    _PR_SET_PDEATHSIG = 1

    def _die_with_parent() -> None:
        """In the child, between fork and exec: SIGTERM when the launching process dies, however it
        dies (a crashed or killed trainer must not leave servers holding GPUs; SGLang's own
        workers follow their server)."""
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

else:
    _die_with_parent = None


def wait_until_healthy(servers: Sequence[ServerProcess], timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until every server answers ``/health``; a server that exits or stays silent past
    timeout_s stops them all and raises ``EngineError`` with the end of its log."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            code = server.process.poll()
            if code is not None:
                _stop_all(servers)
                raise EngineError(
                    f"SGLang server {server.url} exited with code {code} while starting; "
                    f"{server.log_path} ends with:\n{server.log_tail()}"
                )
            if SGLangHTTPClient(server.url).health():
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            _stop_all(servers)
            names = ", ".join(s.url for s in pending)
            raise EngineError(
                f"SGLang server(s) {names} not healthy after {timeout_s:g} s; "
                f"{pending[0].log_path} ends with:\n{pending[0].log_tail()}"
            )
        if pending:
            time.sleep(poll_s)


def _stop_all(servers: Sequence[ServerProcess]) -> None:
    for server in servers:
        server.stop()
