"""The SRPO objective and its variants (paper sec. 3.3 and 4.3; ALGORITHM.md sec. 6-7).

    L = [ sum_{i,t} z_i^GRPO M_{i,t} l^GRPO_{i,t} + sum_{i,t} z_i^SDPO M_{i,t} w_{i,t} l^SDPO_{i,t} ] / N

    l^GRPO_t = w^TIS_t * clipped-surrogate_t          (policy_loss.py)
    l^SDPO_t = w^TIS_t * w^IS_t * JSD_alpha(P_t, Q_t)   (distillation.py)
    w_t      = exp(-beta H_t) / global SDPO mean     (weighting.py; srpo only, 1 otherwise)

N is passed in: the GLOBAL count of tokens that the variant averages over (`count_denominator_tokens`,
summed over micro-batches and all-reduced over data-parallel ranks by the caller). Each micro-batch
returns its numerator / N, so summing micro-batch gradients gives the full-batch gradient exactly.

Variants (sec. 7): `grpo` (all rollouts GRPO), `sdpo` (rollouts with a correct sibling, correct
ones included, get unweighted SDPO; the others no loss; N = distilled tokens), `srpo`, `srpo_no_dw`
(w = 1), `advantage_mix` (GRPO loss with A_t = lambda * A_GRPO + (1 - lambda) * A_SDPO_t,
A_SDPO_t = sg(log p_T(y_t) - log p_S(y_t)) on rollouts with a teacher and 0 on the others).

Usage per training step (the trainer owns every reduction):
    routing = route_rollouts(rewards, group_ids, cfg, generator)
    N = all_reduce(sum over micro-batches of count_denominator_tokens(cfg, loss_mask, route_sdpo))
    if cfg.uses_dynamic_weighting:
        S, C = all_reduce(sum over micro-batches of compute_weight_stats(teacher_entropy,
                          loss_mask.bool() & route_sdpo[:, None], cfg.entropy_beta))
    for each micro-batch: loss, metrics = compute_srpo_loss(cfg, batch, N, S, C); loss.backward()

Nothing here reads a tensor's value on the host when the inputs are complete (every tensor a
variant uses is given): both branches of the variant are computed on every token and masked, so a
GPU never waits inside the loss. Rows may be rollouts ([B, T]) or single tokens ([N, 1], the
trainer's token-major layout); the math is elementwise either way.
"""

from dataclasses import dataclass

import torch

from srpo_megatron.algorithms.config import AlgorithmConfig
from srpo_megatron.algorithms.distillation import compute_distill_is_weights, compute_distill_loss
from srpo_megatron.algorithms.policy_loss import LOG_RATIO_CLAMP, compute_policy_loss, compute_tis_weights
from srpo_megatron.algorithms.stats import Max, Mean, Metric, Min
from srpo_megatron.algorithms.weighting import compute_entropy_weights


@dataclass(kw_only=True)
class LossBatch:
    """Per-token inputs of one micro-batch: B rollouts, T response positions, K top-k ids.

    ``logp`` and ``student_topk_logp`` come from the forward pass being trained (with grad); the
    trainer builds everything else before that pass and fills those two in its loss function.
    Teacher tensors are read only on rollouts that have a teacher (route_sdpo, or has_teacher for
    advantage_mix); elsewhere they may hold any finite filler, or be None when no rollout of the
    micro-batch needs them.
    """

    old_logp: torch.Tensor  # [B, T] pi_old log-prob (trainer recompute, no grad)
    rollout_logp: torch.Tensor  # [B, T] rollout engine log-prob
    loss_mask: torch.Tensor  # [B, T] 1 on valid response tokens
    advantages: torch.Tensor  # [B] group-relative advantage per rollout
    route_sdpo: torch.Tensor  # [B] bool, rollouts on the SDPO branch (never for grpo, advantage_mix)
    has_teacher: torch.Tensor  # [B] bool, rollouts with a correct sibling (m_i)
    fallback: torch.Tensor  # [B] bool, wrong rollouts without a correct sibling
    logp: torch.Tensor | None = None  # [B, T] student log-prob of the sampled token (with grad)
    topk_ids: torch.Tensor | None = None  # [B, T, K] the student's top-K ids (fixed by the old pass)
    student_topk_logp: torch.Tensor | None = None  # [B, T, K] student log-probs at topk_ids (with grad)
    teacher_topk_logp: torch.Tensor | None = None  # [B, T, K] teacher log-probs at the same ids
    teacher_entropy: torch.Tensor | None = None  # [B, T] full-vocab teacher entropy (srpo)
    teacher_logp: torch.Tensor | None = None  # [B, T] teacher log-prob of the sampled token (advantage_mix)


def count_denominator_tokens(
    cfg: AlgorithmConfig, loss_mask: torch.Tensor, route_sdpo: torch.Tensor
) -> torch.Tensor:
    """Local number of tokens the variant averages over: all valid tokens, or for `sdpo` only the
    distilled ones. The caller sums it over micro-batches and data-parallel ranks.  -> scalar"""
    mask = loss_mask.bool()
    if cfg.variant == "sdpo":
        mask = mask & route_sdpo.bool()[:, None]
    return mask.sum()


def _require(tensor: torch.Tensor | None, name: str, why: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"LossBatch.{name} is required {why}")
    return tensor


def compute_grpo_token_loss(
    cfg: AlgorithmConfig, batch: LossBatch, tis: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-branch token loss [B, T] (unmasked) and its per-token statistics."""
    adv = batch.advantages.detach().to(batch.logp.dtype)[:, None].expand_as(batch.logp)  # [B, T]
    stats: dict[str, torch.Tensor] = {}
    if cfg.variant == "advantage_mix":
        has_teacher = batch.has_teacher.bool()[:, None]  # [B, 1]
        adv_sdpo = torch.zeros_like(adv)
        if batch.teacher_logp is not None:
            adv_sdpo = torch.where(has_teacher, (batch.teacher_logp - batch.logp).detach(), 0.0)
        elif bool(has_teacher.any()):  # reads the mask only when the input is missing
            _require(None, "teacher_logp", "for advantage_mix")
        adv = cfg.mix_lambda * adv + (1.0 - cfg.mix_lambda) * adv_sdpo
        stats["adv_sdpo"] = adv_sdpo
    token_loss, clip_stats = compute_policy_loss(
        batch.logp, batch.old_logp, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip
    )
    token_loss = token_loss * tis
    return token_loss, stats | clip_stats


def compute_sdpo_token_loss(
    cfg: AlgorithmConfig,
    batch: LossBatch,
    tis: torch.Tensor,
    weight_sum: float | torch.Tensor | None,
    weight_count: float | torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDPO-branch token loss [B, T] (unmasked, DW weights applied) and its per-token statistics."""
    why = "when a rollout is routed to SDPO"
    student_topk_logp = _require(batch.student_topk_logp, "student_topk_logp", why)
    teacher_topk_logp = _require(batch.teacher_topk_logp, "teacher_topk_logp", why)
    divergence = compute_distill_loss(student_topk_logp, teacher_topk_logp, cfg.jsd_alpha, cfg.tail_bucket)
    is_weight = compute_distill_is_weights(batch.logp, batch.old_logp, cfg.distill_is_cap)  # [B, T]
    weight = torch.ones_like(divergence)
    if cfg.uses_dynamic_weighting:
        teacher_entropy = _require(batch.teacher_entropy, "teacher_entropy", "for srpo dynamic weighting")
        if weight_sum is None or weight_count is None:
            raise ValueError("srpo dynamic weighting needs the global weight_sum and weight_count")
        weight = compute_entropy_weights(teacher_entropy, cfg.entropy_beta, weight_sum, weight_count)
    token_loss = divergence * is_weight * tis * weight
    stats = {"divergence": divergence.detach(), "is_weight": is_weight, "weight": weight}
    return token_loss, stats


def compute_srpo_loss(
    cfg: AlgorithmConfig,
    batch: LossBatch,
    num_tokens: float | torch.Tensor,
    weight_sum: float | torch.Tensor | None = None,
    weight_count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the global objective, and its metrics.

    Args:
        cfg: the algorithm config (variant selects the branches).
        batch: per-token inputs (see LossBatch).
        num_tokens: GLOBAL denominator N (see count_denominator_tokens), > 0.
        weight_sum, weight_count: GLOBAL sum of exp(-beta H) and count over SDPO tokens (srpo only).
    Returns:
        loss: scalar, numerator of this micro-batch / N.
        metrics: this micro-batch's statistics as means and extremes to combine (``stats.py``;
            see `collect_metrics`); loss/grpo and loss/sdpo over the denominator tokens.
    """
    if not isinstance(num_tokens, torch.Tensor) and num_tokens <= 0:
        raise ValueError(f"num_tokens (the global denominator) must be > 0, got {num_tokens}")
    _require(batch.logp, "logp", "(the forward pass's log-probs)")
    mask = batch.loss_mask.bool()  # [B, T]
    route_sdpo = batch.route_sdpo.bool()[:, None]  # [B, 1]
    has_grpo = cfg.variant != "sdpo"
    has_sdpo = cfg.variant in ("sdpo", "srpo", "srpo_no_dw")
    grpo_mask = mask & ~route_sdpo if has_grpo else torch.zeros_like(mask)
    sdpo_mask = mask & route_sdpo if has_sdpo else torch.zeros_like(mask)
    tis = compute_tis_weights(batch.old_logp, batch.rollout_logp, cfg.tis_cap)  # [B, T]

    # 0 * (valid logp) keeps the loss in the graph even when no token of this micro-batch counts
    # (the pipeline schedule calls backward on every micro-batch's loss).
    grpo_sum = torch.where(mask, batch.logp, 0.0).sum() * 0.0
    grpo_stats: dict[str, torch.Tensor] = {}
    if has_grpo:
        grpo_loss, grpo_stats = compute_grpo_token_loss(cfg, batch, tis)
        grpo_sum = grpo_sum + torch.where(grpo_mask, grpo_loss, 0.0).sum()
    sdpo_sum = torch.zeros_like(grpo_sum)
    sdpo_stats: dict[str, torch.Tensor] = {}
    # without its teacher inputs the branch is computed only if a token needs it (a host read)
    if has_sdpo and (batch.teacher_topk_logp is not None or bool(sdpo_mask.any())):
        sdpo_loss, sdpo_stats = compute_sdpo_token_loss(cfg, batch, tis, weight_sum, weight_count)
        sdpo_sum = torch.where(sdpo_mask, sdpo_loss, 0.0).sum()

    loss = (grpo_sum + sdpo_sum) / num_tokens
    masks = {"valid": mask, "grpo": grpo_mask, "sdpo": sdpo_mask}
    metrics = collect_metrics(batch, masks, tis, grpo_stats, sdpo_stats)
    # the loss terms as means over the tokens the variant averages over (count_denominator_tokens)
    count = count_denominator_tokens(cfg, batch.loss_mask, batch.route_sdpo)
    metrics["loss/grpo"] = Mean(grpo_sum.detach(), count)
    metrics["loss/sdpo"] = Mean(sdpo_sum.detach(), count)
    return loss, metrics


def collect_metrics(
    batch: LossBatch,
    masks: dict[str, torch.Tensor],
    tis: torch.Tensor,
    grpo_stats: dict[str, torch.Tensor],
    sdpo_stats: dict[str, torch.Tensor],
) -> dict[str, Metric]:
    """Micro-batch statistics, the same keys every call ("group/what"), each over its tokens."""
    valid, grpo, sdpo = masks["valid"], masks["grpo"], masks["sdpo"]
    zeros = torch.zeros_like(tis)
    raw_is = (batch.logp - batch.old_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    raw_tis = (batch.old_logp - batch.rollout_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    weight = sdpo_stats.get("weight", zeros)
    return {
        "route/sdpo_token_frac": Mean(sdpo.sum(), valid.sum()),
        "route/grpo_token_frac": Mean(grpo.sum(), valid.sum()),
        "is/tis_mean": Mean.over(tis, valid),
        "is/tis_capped_frac": Mean.over(raw_tis > tis, valid),
        "grpo/clip_frac": Mean.over(grpo_stats.get("clipped", zeros), grpo),
        "grpo/dual_clip_frac": Mean.over(grpo_stats.get("dual_clipped", zeros), grpo),
        "grpo/ratio_mean": Mean.over(grpo_stats.get("ratio", zeros), grpo),
        "grpo/adv_sdpo_mean": Mean.over(grpo_stats.get("adv_sdpo", zeros), grpo),
        "sdpo/divergence_mean": Mean.over(sdpo_stats.get("divergence", zeros), sdpo),
        "sdpo/is_weight_mean": Mean.over(sdpo_stats.get("is_weight", zeros), sdpo),
        "sdpo/is_clip_frac": Mean.over(raw_is > sdpo_stats.get("is_weight", raw_is), sdpo),
        "dw/weight_mean": Mean.over(weight, sdpo),
        "dw/weight_min": Min.over(weight, sdpo),
        "dw/weight_max": Max.over(weight, sdpo),
    }
