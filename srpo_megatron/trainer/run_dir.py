"""The run directory (``<output_dir>``): one trainer at a time, and what a start does to it.

- ``lock_run_dir``: an exclusive ``flock`` on ``<output_dir>/trainer.lock``, held by global rank 0
  for the whole run. The kernel drops it when the process dies, however it dies, so a stale lock
  cannot outlive its trainer; a second trainer on the directory stops at once, naming the holder.
- ``ckpt.resume=none`` on a directory that holds a run (metrics or checkpoints) is refused: its
  checkpoints would collide with the new run's and its metrics lines would mix with them. Nothing
  is moved or deleted; the message says how to continue it or where to start over.
- ``restore_metrics``: metrics.jsonl is reset to the copy in the checkpoint the run continues
  from (steps 1..N, each once, in order), or emptied on a fresh start: the lines a killed run
  logged after its last checkpoint are logged again by the continuation.
"""

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from srpo_megatron.errors import UserError

LOCK_FILE = "trainer.lock"
METRICS_FILE = "metrics.jsonl"


def lock_run_dir(output_dir: Path) -> IO:
    """The open, locked lock file: the lock lasts while it stays open (close() releases it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 (open for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a trainer that has not written its name yet"
        handle.close()
        raise UserError(
            f"{output_dir} is in use by another trainer ({holder}); two trainers must not write one "
            "run directory: stop that one or wait for it, or set another log.run_name"
        ) from None
    except OSError as err:
        handle.close()
        raise UserError(
            f"cannot lock {path} ({err}): log.output_dir must be on a file system with flock"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    return handle


def refuse_to_start_over(output_dir: Path, checkpoint_root: Path) -> None:
    """UserError if ``output_dir`` holds a run (for ``ckpt.resume=none``)."""
    metrics = output_dir / METRICS_FILE
    logged = metrics.is_file() and metrics.stat().st_size > 0
    saved = sorted(p.name for p in checkpoint_root.iterdir()) if checkpoint_root.is_dir() else []
    if logged or saved:
        what = f"checkpoints {', '.join(saved)}" if saved else f"{METRICS_FILE} of an earlier run"
        raise UserError(
            f"ckpt.resume=none, but {output_dir} holds a run ({what}); to continue it use "
            f"ckpt.resume=auto, to start over set another log.run_name or remove {output_dir}"
        )


def restore_metrics(output_dir: Path, checkpoint: Path | None) -> None:
    """metrics.jsonl as of ``checkpoint`` (None: a fresh start, no lines). Before the logger opens it."""
    metrics = output_dir / METRICS_FILE
    if checkpoint is None:
        metrics.unlink(missing_ok=True)
        return
    partial = metrics.with_suffix(".jsonl.tmp")
    shutil.copyfile(checkpoint / METRICS_FILE, partial)
    os.replace(partial, metrics)  # a kill leaves the old file or the restored one, never a mix
