"""Train-vs-rollout log-prob gap on the sampled tokens.

    gap_t = | logp_train(y_t) - logp_rollout(y_t) |   over tokens with loss_mask = 1

Both sides score the same token under the same weights (just synced) and the same temperature, so
the gap measures engine/trainer numerics (kernels, bf16, TP reductions) plus any mapping bug in the
weight sync. Nothing here reduces across ranks: the trainer all-reduces ``abs_sum`` and
``num_tokens`` (SUM) and ``max_abs`` (MAX) over data-parallel ranks, then reads ``mean``.
"""

from dataclasses import dataclass

import torch


@dataclass
class LogpGap:
    abs_sum: float
    max_abs: float
    num_tokens: int

    @property
    def mean(self) -> float:
        return self.abs_sum / max(self.num_tokens, 1)

    def as_metrics(self, prefix: str = "rollout/logp_gap") -> dict[str, float]:
        return {f"{prefix}_mean": self.mean, f"{prefix}_max": self.max_abs}


def logp_gap(train_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor) -> LogpGap:
    """train_logp, rollout_logp, loss_mask: same shape (e.g. [B, T] or packed [T])."""
    if train_logp.shape != rollout_logp.shape or train_logp.shape != loss_mask.shape:
        raise ValueError(
            f"shapes differ: train {tuple(train_logp.shape)}, rollout {tuple(rollout_logp.shape)}, "
            f"mask {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    diff = (train_logp.detach().double() - rollout_logp.detach().double()).abs()[mask]  # [N]
    return LogpGap(
        abs_sum=float(diff.sum()),
        max_abs=float(diff.max()) if diff.numel() else 0.0,
        num_tokens=int(diff.numel()),
    )
