"""GRPO branch token loss (paper sec. 2.1 and 4.1 "strengthened GRPO"; ALGORITHM.md sec. 3).

    rho_t  = exp(clamp(logp_t - old_logp_t, -20, 20))
    L1_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))   (DAPO clip-higher)
    L_t    = min(L1_t, -A_t * c)  if A_t < 0  else  L1_t                        (dual clip, c = 3)
    w_t    = min(exp(clamp(old_logp_t - rollout_logp_t, -20, 20)), C)           (truncated IS, C = 2)
    loss_t = w_t * L_t

w is a constant: it corrects for the rollout engine's numerics (pi_roll != pi_old), not a term
to differentiate. The ratio is clamped in log space so a stray -inf never makes an inf * 0 NaN.
"""

import torch

LOG_RATIO_CLAMP = 20.0


def compute_tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_roll, cap), detached.  [B, T] -> [B, T]"""
    log_ratio = (old_logp - rollout_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=cap)


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate with asymmetric clip and dual clip (no TIS, no mask).

    Args:
        logp: [B, T] current log-prob of the sampled token (with grad).
        old_logp: [B, T] log-prob under pi_old (no grad).
        advantages: [B, T] per-token advantage (no grad).
    Returns:
        token_loss [B, T], and bool masks [B, T]: "clipped" (the clipped term won, i.e. the token's
        gradient is zero through the ratio), "dual_clipped" (the dual-clip bound won), and the
        ratio itself (detached) for statistics.
    """
    advantages = advantages.detach()
    ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B, T]
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss1 = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * dual_clip  # a constant bound for A < 0
    negative = advantages < 0
    token_loss = torch.where(negative, torch.minimum(loss1, loss_dual), loss1)
    stats = {
        "clipped": (loss_clipped > loss_unclipped),
        "dual_clipped": negative & (loss_dual < loss1),
        "ratio": ratio.detach(),
    }
    return token_loss, stats
