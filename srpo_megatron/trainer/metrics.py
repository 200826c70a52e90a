"""Per-step metrics: ``<output_dir>/metrics.jsonl`` (one JSON object per step, flushed at once so
a crash loses nothing already logged), TensorBoard events, optional wandb, and a live line.

Only the logging rank (global rank 0) writes; every rank may call ``log`` (others do nothing).
"""

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

# The keys the progress line shows, in order, with their short labels.
_LINE = (
    ("reward_mean", "reward"),
    ("sdpo_fraction", "sdpo"),
    ("teacher_entropy_mean", "H_T"),
    ("loss", "loss"),
    ("grad_norm", "|g|"),
    ("response_length_mean", "len"),
    ("logp_gap_mean", "gap"),
    ("time/total", "s/step"),
)


class PhaseTimer:
    """``with timer("rollout"): ...`` accumulates wall seconds under ``time/rollout``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str = "run",
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False)
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (lives with the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            import wandb  # optional: pip install wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def print_line(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{total_steps}"]
        parts += [f"{label} {metrics[key]:.4g}" for key, label in _LINE if key in metrics]
        self.console.print("  ".join(parts), soft_wrap=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value):
    """Tensors and numpy scalars -> Python numbers, for JSON."""
    if hasattr(value, "item"):
        return value.item()
    return value
