"""Per-step metrics: ``<output_dir>/metrics.jsonl`` (one JSON object per step, flushed at once so
a crash loses nothing already logged), TensorBoard events, optional wandb, and a live line.

Only the logging rank (global rank 0) writes; every rank may call ``log`` (others do nothing).
``reduce_train_metrics`` and ``from_last_stage`` bring the training metrics of every micro-batch,
update and rank to that one rank, one number per key.
"""

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
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


# The tokens each per-micro-batch statistic is a mean over, by key prefix.
_TOKENS_OF = {
    "route/": lambda m: m["valid_tokens"],
    "is/": lambda m: m["valid_tokens"],
    "grpo/": lambda m: round(m["route/grpo_token_frac"] * m["valid_tokens"]),
    "sdpo/": lambda m: round(m["route/sdpo_token_frac"] * m["valid_tokens"]),
    "dw/": lambda m: round(m["route/sdpo_token_frac"] * m["valid_tokens"]),
}


def reduce_train_metrics(per_update: list[dict], group) -> dict[str, float]:
    """One number per key over the step's optimizer updates, their micro-batches and every rank of
    ``group`` (data parallel; a collective on the last pipeline stage, where the micro-batch
    metrics are).

    Loss terms are numerators: summed, then divided by the step's global token count. Statistics
    are token-weighted means over their branch's tokens (0 where a branch has none); weight min /
    max are the extremes over the tokens that have a weight.
    """
    out: dict[str, float] = {}
    for key in ("grad_norm", "lr", "update_ok"):  # the same on every rank
        values = [u[key] for u in per_update if math.isfinite(u[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    out["skipped_updates"] = sum(u["skipped_update"] for u in per_update)
    micro = [m for update in per_update for m in update["micro_batches"]]
    if not micro:  # not the last pipeline stage
        return out
    means = [k for k in micro[0] if k.startswith(tuple(_TOKENS_OF)) and not k.endswith(("_min", "_max"))]
    extremes = [k for k in micro[0] if k.endswith(("_min", "_max"))]
    sums = torch.zeros(3 + 2 * len(means), dtype=torch.float64)  # loss numerators, token count, ...
    for m in micro:
        sums[0] += m["loss/grpo"]
        sums[1] += m["loss/sdpo"]
        sums[2] += m["num_tokens"]
        for j, key in enumerate(means):
            tokens = next(weigh(m) for prefix, weigh in _TOKENS_OF.items() if key.startswith(prefix))
            sums[3 + 2 * j] += m[key] * tokens
            sums[4 + 2 * j] += tokens
    # an extreme over no token is +-inf here and 0 in the log, as the loss's own metrics have it
    lows = torch.full((len(extremes),), math.inf, dtype=torch.float64)
    highs = torch.full((len(extremes),), -math.inf, dtype=torch.float64)
    for m in micro:
        if _TOKENS_OF["dw/"](m) == 0:
            continue  # dw/weight_* are over SDPO tokens
        for j, key in enumerate(extremes):
            lows[j] = min(lows[j], m[key])
            highs[j] = max(highs[j], m[key])
    dist.all_reduce(sums, group=group)
    dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=group)

    tokens = max(float(sums[2]), 1.0)
    out["loss/grpo"] = float(sums[0]) / tokens
    out["loss/sdpo"] = float(sums[1]) / tokens
    out["loss"] = out["loss/grpo"] + out["loss/sdpo"]
    for j, key in enumerate(means):
        weight = float(sums[4 + 2 * j])
        out[key] = float(sums[3 + 2 * j]) / weight if weight > 0 else 0.0
    for j, key in enumerate(extremes):
        value = float(lows[j] if key.endswith("_min") else highs[j])
        out[key] = value if math.isfinite(value) else 0.0
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
