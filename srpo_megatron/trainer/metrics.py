"""Per-step metrics: ``<output_dir>/metrics.jsonl`` (one JSON object per step, flushed at once so
a crash loses nothing already logged), TensorBoard events, optional wandb, and a live line.

Only the logging rank (global rank 0) writes; every rank may call ``log`` (others do nothing).
``MetricSums`` combines a step's typed metrics on the device; ``reduce_train_metrics`` and
``from_last_stage`` bring those of every micro-batch, update and rank to that one rank, one
number per key.
"""

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from rich.console import Console

from srpo_megatron.algorithms.stats import Max, Mean, Metric, Min

if TYPE_CHECKING:
    from srpo_megatron.trainer.actor import Update

# The keys the progress line shows, in order, with their short labels (an evaluation's result
# follows on a line of its own: loop._train).
_LINE = (
    ("reward_mean", "reward"),
    ("format_rate", "format"),
    ("sdpo_fraction", "sdpo"),
    ("route/grpo_token_frac", "grpo_tok"),
    ("route/sdpo_token_frac", "sdpo_tok"),
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


class MetricSums:
    """A step's typed metrics (``algorithms/stats.py``), combined on the device as they come
    (``add``), then over a group of ranks in one all-reduce per kind (``reduce``)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for name, metric in metrics.items():
            held = self._metrics.get(name)
            if held is not None and type(held) is not type(metric):
                raise TypeError(f"metric {name}: a {type(metric).__name__} after a {type(held).__name__}")
            self._metrics[name] = metric if held is None else held + metric

    def __bool__(self) -> bool:
        return bool(self._metrics)

    def reduce(self, group) -> dict[str, float]:
        """Collective over ``group`` (every rank holds the same names): one number per name. A mean
        over no element is 0, as is an extreme over none."""
        names = sorted(self._metrics)
        means = [n for n in names if isinstance(self._metrics[n], Mean)]
        out: dict[str, float] = {}
        if means:
            parts = [t.double() for n in means for t in (self._metrics[n].total, self._metrics[n].count)]
            sums = torch.stack(parts)
            dist.all_reduce(sums, group=group)
            values = sums.view(-1, 2).tolist()  # the step's one host read of its means
            out |= {
                n: total / count if count > 0 else 0.0
                for n, (total, count) in zip(means, values, strict=True)
            }
        for kind, op in ((Min, dist.ReduceOp.MIN), (Max, dist.ReduceOp.MAX)):
            chosen = [n for n in names if isinstance(self._metrics[n], kind)]
            if not chosen:
                continue
            extremes = torch.stack([self._metrics[n].value.double() for n in chosen])
            dist.all_reduce(extremes, op=op, group=group)
            out |= {n: v if math.isfinite(v) else 0.0 for n, v in zip(chosen, extremes.tolist(), strict=True)}
        return out


def reduce_train_metrics(updates: "list[Update]", sums: MetricSums, group) -> dict[str, float]:
    """One number per key over the step's optimizer updates, their micro-batches and every rank of
    ``group`` (data parallel; a collective on the last pipeline stage, where ``sums`` holds the
    loss's metrics and the step's other statistics; empty elsewhere).

    Loss terms are their numerators over the step's global token count; statistics are means over
    their tokens (0 where there are none); weight min / max are the extremes over the weighted tokens.
    """
    out: dict[str, float] = {}
    grad_norms = [u.grad_norm for u in updates if math.isfinite(u.grad_norm)]
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["lr"] = sum(u.lr for u in updates) / len(updates)
    out["update_ok"] = sum(u.ok for u in updates) / len(updates)
    out["skipped_updates"] = sum(not u.ok for u in updates)
    if not sums:  # not the last pipeline stage
        return out
    out |= sums.reduce(group)
    out["loss"] = out["loss/grpo"] + out["loss/sdpo"]
    return out


def from_last_stage(metrics: dict) -> dict:
    """Loss metrics live on the last pipeline stage; the logging rank (global 0) takes them from there."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    box = [metrics]
    dist.broadcast_object_list(box, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]
