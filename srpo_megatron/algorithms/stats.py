"""Metrics as the numbers they combine from, so that micro-batches, optimizer updates and
data-parallel ranks add up exactly, whatever the batching:

    Mean(total, count)   a mean over some tokens: totals and counts are summed, divided at the end
    Min(value), Max(value)   an extreme: +inf / -inf over no element (logged as 0)

Values are detached 0-dim tensors on the device that computed them. Nothing here reads a value on
the host: the trainer combines a step's metrics on the device and reduces them over data-parallel
ranks in one collective per kind (``trainer/metrics.py``).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mean:
    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def over(cls, x: torch.Tensor, mask: torch.Tensor) -> "Mean":
        """The mean of ``x`` over the elements where ``mask`` is True."""
        return cls(torch.where(mask, x.detach().float(), 0.0).sum(), mask.sum())

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.count + other.count)


@dataclass(frozen=True)
class Min:
    value: torch.Tensor

    @classmethod
    def over(cls, x: torch.Tensor, mask: torch.Tensor) -> "Min":
        return cls(_extreme(x, mask, math.inf, torch.amin))

    def __add__(self, other: "Min") -> "Min":
        return Min(torch.minimum(self.value, other.value))


@dataclass(frozen=True)
class Max:
    value: torch.Tensor

    @classmethod
    def over(cls, x: torch.Tensor, mask: torch.Tensor) -> "Max":
        return cls(_extreme(x, mask, -math.inf, torch.amax))

    def __add__(self, other: "Max") -> "Max":
        return Max(torch.maximum(self.value, other.value))


Metric = Mean | Min | Max


def _extreme(x: torch.Tensor, mask: torch.Tensor, empty: float, reduce) -> torch.Tensor:
    if x.numel() == 0:  # a shape, known on the host
        return torch.tensor(empty, device=x.device)
    return reduce(torch.where(mask, x.detach().float(), empty))
