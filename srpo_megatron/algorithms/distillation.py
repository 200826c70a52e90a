"""SDPO per-token distillation loss over the student's top-K support (paper sec. 2.2;
ALGORITHM.md sec. 4).

At each position the support is the student's top-K vocabulary ids v_1..v_K. With the tail bucket
(default) the two distributions have K + 1 buckets:

    P = [p_S(v_1) .. p_S(v_K), 1 - sum_k p_S(v_k)]        (student, with grad)
    Q = [p_T(v_1) .. p_T(v_K), 1 - sum_k p_T(v_k)]        (EMA teacher at the SAME ids, no grad)

the tail computed stably as log(-expm1(min(logsumexp(logp_topk), -1e-7))). With the tail off both
top-K vectors are renormalised instead. The divergence is the generalised Jensen-Shannon:

    log M = logsumexp([log(1 - alpha) + log P, log(alpha) + log Q])
    l_t   = (1 - alpha) * KL(P || M) + alpha * KL(Q || M)

with the two endpoints defined as the KLs they tend to (after dividing by alpha, resp. 1 - alpha):
alpha = 0 -> KL(Q || P) (forward, teacher -> student), alpha = 1 -> KL(P || Q) (reverse).
The SDPO token loss is then scaled by the detached IS weight min(exp(clamp(logp - old_logp)), cap).

Log-probs must be finite (log-softmax of finite logits always is); padded positions may hold any
finite value, the caller masks them.
"""

import math

import torch

from srpo_megatron.algorithms.policy_loss import LOG_RATIO_CLAMP

TAIL_LOGSUMEXP_MAX = -1e-7  # keeps log(1 - sum p_topk) finite when the top-K hold all the mass


def compute_tail_logp(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k exp(topk_logp)), stably.  [..., K] -> [..., 1]"""
    log_mass = torch.logsumexp(topk_logp, dim=-1, keepdim=True).clamp(max=TAIL_LOGSUMEXP_MAX)
    return torch.log(-torch.expm1(log_mass))


def build_bucket_logp(topk_logp: torch.Tensor, tail_bucket: bool) -> torch.Tensor:
    """Log-probs of the distillation buckets.  [..., K] -> [..., K + 1] (tail) or [..., K] (renormalised)."""
    if tail_bucket:
        return torch.cat([topk_logp, compute_tail_logp(topk_logp)], dim=-1)
    return topk_logp - torch.logsumexp(topk_logp, dim=-1, keepdim=True)


def kl_divergence(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) = sum_v a_v (log a_v - log b_v) over the last dim.  [..., N] -> [...]"""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def compute_generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalised JSD between student P and teacher Q over the last dim.  [..., N] -> [...]"""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"jsd alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return kl_divergence(log_q, log_p)  # forward KL
    if alpha == 1.0:
        return kl_divergence(log_p, log_q)  # reverse KL
    log_m = torch.logaddexp(log_p + math.log(1.0 - alpha), log_q + math.log(alpha))
    return (1.0 - alpha) * kl_divergence(log_p, log_m) + alpha * kl_divergence(log_q, log_m)


def compute_distill_loss(
    student_topk_logp: torch.Tensor, teacher_topk_logp: torch.Tensor, alpha: float, tail_bucket: bool
) -> torch.Tensor:
    """Per-token SDPO divergence (no mask, no IS weight).

    Args:
        student_topk_logp: [B, T, K] full-vocab-normalised student log-probs at its top-K ids (with grad).
        teacher_topk_logp: [B, T, K] teacher log-probs at the same ids (gradient is not taken).
    Returns:
        [B, T] divergence l_t.
    """
    if student_topk_logp.shape != teacher_topk_logp.shape:
        raise ValueError(
            f"student and teacher top-k log-probs differ in shape: "
            f"{tuple(student_topk_logp.shape)} vs {tuple(teacher_topk_logp.shape)}"
        )
    log_p = build_bucket_logp(student_topk_logp, tail_bucket)
    log_q = build_bucket_logp(teacher_topk_logp.detach(), tail_bucket)
    return compute_generalized_jsd(log_p, log_q, alpha)


def compute_distill_is_weights(logp: torch.Tensor, old_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """IS clip of the distillation loss: min(exp(clamp(sg(logp - old_logp), -20, 20)), cap).  [B, T] -> [B, T]"""
    log_ratio = (logp - old_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=cap)
