"""Run a function in N local processes, for tests, benchmarks and CPU tools.

``run_distributed(fn, world_size=2, layout=ParallelLayout(tp=2))`` spawns ``world_size``
processes on a free port, starts gloo (NCCL on GPUs) and Megatron's parallel state with the given
layout in each, calls ``fn(*args, **kwargs)`` and returns the per-rank results in rank order. A
child's exception comes back as ``ChildProcessError`` carrying the child's full traceback; a hang
ends in ``TimeoutError`` after ``timeout`` seconds with every child killed.

``fn`` must be importable by the children (a module-level function): they are started with
``spawn``, the only start method that is safe with threads and with CUDA.
"""

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from srpo_megatron.runtime.distributed import (
    ParallelLayout,
    destroy_distributed,
    find_free_port,
    init_distributed,
)
from srpo_megatron.runtime.quiet import silence_known_noise


def _worker(rank, world_size, port, layout, megatron, seed, fn, args, kwargs, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    silence_known_noise()  # a spawned child starts with Python's default filters
    try:
        init_distributed(layout, seed=seed, megatron=megatron, timeout_minutes=5)
        result = fn(*args, **kwargs)
        # Plain pickle (not torch's shared-memory reducer): the child may exit before the parent reads.
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_distributed()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    layout: ParallelLayout = ParallelLayout(),
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    megatron: bool = True,
    seed: int = 1234,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; return the list of per-rank return values."""
    layout.data_parallel_size(world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, layout, megatron, seed, fn, args, kwargs or {}, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
                outcomes[rank] = (status, payload)
                if status == "error":
                    break  # the other ranks are likely blocked in a collective with this one
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    codes = {r: procs[r].exitcode for r in dead}
                    raise ChildProcessError(
                        f"rank(s) {dead} died without a result (exit codes {codes})"
                    ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - outcomes.keys())
                    raise TimeoutError(
                        f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f} s"
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcomes) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()

    errors = {r: tb for r, (status, tb) in outcomes.items() if status == "error"}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise ChildProcessError(f"{fn.__name__} failed on rank(s) {sorted(errors)}:\n{text}")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
