"""Tail log-mass of a top-k support (ALGORITHM.md sec. 4, the K+1-th bucket).

    tail = log(1 - sum_k p_k) = log(-expm1(min(logsumexp_k(logp_k), -1e-7)))

logsumexp keeps the top-k mass in log space; ``-expm1(x)`` is 1 - exp(x) without cancellation when
the top-k mass is close to 1 (x close to 0); the clamp at -1e-7 keeps the tail finite
(log(-expm1(-1e-7)) ~ -16.1) when the top-k covers all the mass up to rounding, and blocks the
gradient there instead of sending an infinite one.
"""

import torch

MAX_TOPK_LOGMASS = -1e-7


def tail_logmass(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(topk_logp), -1)), stable: topk_logp [..., k] -> [...]. Differentiable."""
    topk_logmass = torch.logsumexp(topk_logp, dim=-1).clamp(max=MAX_TOPK_LOGMASS)  # [...]
    return torch.log(-torch.expm1(topk_logmass))
