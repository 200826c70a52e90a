"""Entropy-aware dynamic weighting of SDPO tokens, DW-SDPO (paper sec. 3.2; ALGORITHM.md sec. 5).

    w~_{i,t} = exp(-beta * H_{i,t})            H = full-vocab entropy of the teacher at position t
    w_{i,t}  = w~_{i,t} / mean_{(j,s) in Omega_SDPO} w~_{j,s}

Omega_SDPO is every valid token of every SDPO-routed rollout in the GLOBAL batch. The mean is not
computable from one micro-batch, so the trainer calls `compute_weight_stats` on each of its
micro-batches, sums (sum, count) over them and all-reduces over data-parallel ranks, then passes the
totals to `compute_entropy_weights`. The weights are constants (no grad); by construction their mean
over Omega_SDPO is exactly 1, so the SDPO branch keeps its loss scale.
"""

import torch


def compute_weight_stats(
    teacher_entropy: torch.Tensor, sdpo_token_mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (sum of exp(-beta * H), count) over the SDPO tokens of this micro-batch.

    Args:
        teacher_entropy: [B, T] teacher entropy (values at unmasked positions are ignored).
        sdpo_token_mask: [B, T] bool, valid tokens of SDPO-routed rollouts.
    Returns:
        two float64 scalars, ready to be summed and all-reduced by the caller.
    """
    mask = sdpo_token_mask.bool()
    raw = torch.exp(-beta * teacher_entropy.detach().double())  # [B, T]
    weight_sum = torch.where(mask, raw, 0.0).sum()
    return weight_sum, mask.sum().double()


def compute_entropy_weights(
    teacher_entropy: torch.Tensor,
    beta: float,
    weight_sum: float | torch.Tensor,
    weight_count: float | torch.Tensor,
) -> torch.Tensor:
    """Normalised weights exp(-beta * H) / (global weight_sum / global weight_count).  [B, T] -> [B, T]

    Python numbers are checked (> 0); tensors are not read on the host: a global count of 0 (no
    SDPO token in the step, so no weight is used) gives weights of 0."""
    if not isinstance(weight_sum, torch.Tensor) and (weight_count <= 0 or weight_sum <= 0):
        raise ValueError(
            f"entropy weights need the global SDPO (weight_sum, weight_count) > 0, got ({weight_sum}, {weight_count})"
        )
    weight_sum = torch.as_tensor(weight_sum, dtype=torch.float64, device=teacher_entropy.device)
    scale = torch.where(weight_sum > 0, weight_count / weight_sum, 0.0)
    raw = torch.exp(-beta * teacher_entropy.detach().double())
    # fp32 at least, whatever the entropy came in as (bf16 would cost the exact mean of 1).
    return (raw * scale).to(torch.promote_types(teacher_entropy.dtype, torch.float32))
