import dataclasses
import math

import pytest
import torch

from srpo_megatron.algorithms.advantages import compute_group_advantages
from srpo_megatron.algorithms.config import AlgorithmConfig
from srpo_megatron.algorithms.objective import LossBatch, compute_srpo_loss, count_denominator_tokens
from srpo_megatron.algorithms.routing import route_rollouts
from srpo_megatron.algorithms.stats import Mean
from srpo_megatron.algorithms.weighting import compute_weight_stats

LN2 = math.log(2.0)
# The K = 3 toy of test_distillation: P = [1/2, 1/4, 1/8, 1/8], Q = [1/8, 1/2, 1/4, 1/8]
STUDENT = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64).log()
TEACHER = torch.tensor([0.125, 0.5, 0.25], dtype=torch.float64).log()
JSD = 0.5 * (0.5 * math.log(8 / 5) + 0.375 * math.log(2 / 3)) + 0.5 * (
    0.125 * math.log(2 / 5) + 0.75 * math.log(4 / 3)
)


def toy_batch(route_sdpo: list[bool]) -> LossBatch:
    """2 rollouts x 2 tokens, all valid.
    rollout 0 (GRPO, A = 0.5): ratio 1; token 0 has pi_old / pi_roll = 3 -> TIS 2, token 1 TIS 1
        -> l = -0.5 * 2 + -0.5 * 1 = -1.5
    rollout 1 (SDPO): token 0 = the K=3 toy (JSD), pi/pi_old = 1.5 -> IS weight 1.5; token 1: P = Q -> 0
        teacher entropy [0, ln 2] -> w~ = [1, 1/2], mean 3/4 -> w = [4/3, 2/3]
        -> l = 1.5 * 4/3 * JSD + 0 = 2 JSD  (with DW), 1.5 JSD (without)
    """
    old_logp = torch.full((2, 2), -1.0, dtype=torch.float64)
    logp = old_logp.clone()
    logp[1, 0] += math.log(1.5)
    rollout_logp = old_logp.clone()
    rollout_logp[0, 0] -= math.log(3.0)
    student = torch.stack([STUDENT, STUDENT]).expand(2, 2, 3).clone()
    teacher = torch.stack([TEACHER, STUDENT]).expand(2, 2, 3).clone()
    return LossBatch(
        logp=logp.requires_grad_(),
        old_logp=old_logp,
        rollout_logp=rollout_logp,
        loss_mask=torch.ones(2, 2),
        advantages=torch.tensor([0.5, -0.5]),
        route_sdpo=torch.tensor(route_sdpo),
        has_teacher=torch.tensor(route_sdpo),
        fallback=torch.tensor([False, False]),
        student_topk_logp=student.requires_grad_(),
        teacher_topk_logp=teacher,
        teacher_entropy=torch.tensor([[0.0, 0.0], [0.0, LN2]], dtype=torch.float64),
    )


def value(metric) -> float:
    """A metric's number as the trainer logs it (trainer/metrics.py, on one rank)."""
    if isinstance(metric, Mean):
        return metric.total.item() / metric.count.item() if metric.count > 0 else 0.0
    return metric.value.item() if math.isfinite(metric.value) else 0.0


def global_stats(cfg, batch):
    n = count_denominator_tokens(cfg, batch.loss_mask, batch.route_sdpo)
    s, c = compute_weight_stats(
        batch.teacher_entropy, batch.loss_mask.bool() & batch.route_sdpo[:, None], cfg.entropy_beta
    )
    return n, s, c


def test_srpo_objective_by_hand():
    cfg = AlgorithmConfig(variant="srpo")
    batch = toy_batch([False, True])
    n, s, c = global_stats(cfg, batch)
    assert n == 4 and c == 2 and s.item() == pytest.approx(1.5)
    loss, m = compute_srpo_loss(cfg, batch, n, s, c)
    assert loss.item() == pytest.approx((-1.5 + 2 * JSD) / 4, abs=1e-12)  # N = 4 valid tokens
    m = {k: value(v) for k, v in m.items()}
    assert m["loss/grpo"] == pytest.approx(-1.5 / 4)
    assert m["loss/sdpo"] == pytest.approx(2 * JSD / 4)
    assert m["route/sdpo_token_frac"] == 0.5 and m["route/grpo_token_frac"] == 0.5
    assert m["dw/weight_min"] == pytest.approx(2 / 3) and m["dw/weight_max"] == pytest.approx(4 / 3)
    assert m["dw/weight_mean"] == pytest.approx(1.0)
    assert m["is/tis_capped_frac"] == pytest.approx(1 / 4)
    assert m["sdpo/is_weight_mean"] == pytest.approx(1.25)  # (1.5 + 1) / 2
    assert m["sdpo/is_clip_frac"] == 0 and m["grpo/clip_frac"] == 0


def test_srpo_without_dynamic_weighting_by_hand():
    cfg = AlgorithmConfig(variant="srpo_no_dw")
    loss, m = compute_srpo_loss(cfg, toy_batch([False, True]), 4)
    assert loss.item() == pytest.approx((-1.5 + 1.5 * JSD) / 4, abs=1e-12)
    assert value(m["dw/weight_mean"]) == 1.0


def test_sdpo_variant_averages_over_distilled_tokens_only():
    cfg = AlgorithmConfig(variant="sdpo")
    batch = toy_batch([False, True])  # rollout 0 has no sibling: no loss at all
    n = count_denominator_tokens(cfg, batch.loss_mask, batch.route_sdpo)
    assert n == 2
    loss, m = compute_srpo_loss(cfg, batch, n)
    assert loss.item() == pytest.approx(1.5 * JSD / 2, abs=1e-12)
    m = {k: value(v) for k, v in m.items()}
    assert m["route/grpo_token_frac"] == 0 and m["route/sdpo_token_frac"] == 0.5 and m["loss/grpo"] == 0


def test_grpo_variant_by_hand():
    cfg = AlgorithmConfig(variant="grpo")
    batch = toy_batch([False, False])
    # rollout 0: -1.5 as above; rollout 1 (A = -0.5): token 0 ratio 1.5 -> L1 = max(0.75, 0.64) = 0.75 -> 0.75;
    # token 1 ratio 1 -> 0.5.  (-1.5 + 0.75 + 0.5) / 4
    loss, m = compute_srpo_loss(cfg, batch, 4)
    assert loss.item() == pytest.approx((-1.5 + 0.75 + 0.5) / 4, abs=1e-12)
    assert value(m["route/grpo_token_frac"]) == 1.0 and value(m["loss/sdpo"]) == 0


def test_advantage_mix_by_hand():
    cfg = AlgorithmConfig(variant="advantage_mix")
    batch = toy_batch([False, False])
    batch = dataclasses.replace(
        batch,
        rollout_logp=batch.old_logp.clone(),
        logp=batch.old_logp.clone().requires_grad_(),
        advantages=torch.tensor([0.5, 0.5]),
        has_teacher=torch.tensor([True, False]),
        teacher_logp=batch.old_logp + torch.tensor([[-1.0, 2.0], [5.0, 5.0]], dtype=torch.float64),
    )
    # rollout 0: A = 0.9 * 0.5 + 0.1 * [-1, 2] = [0.35, 0.65]; ratio 1 -> l = [-0.35, -0.65]
    # rollout 1 (no teacher, A_SDPO = 0): A = 0.45 -> l = [-0.45, -0.45]
    loss, m = compute_srpo_loss(cfg, batch, 4)
    assert loss.item() == pytest.approx((-0.35 - 0.65 - 0.45 - 0.45) / 4, abs=1e-12)
    assert value(m["grpo/adv_sdpo_mean"]) == pytest.approx(0.25)  # (-1 + 2 + 0 + 0) / 4


def test_missing_inputs_raise():
    batch = toy_batch([False, True])
    with pytest.raises(ValueError, match="weight_sum"):
        compute_srpo_loss(AlgorithmConfig(variant="srpo"), batch, 4)
    with pytest.raises(ValueError, match="student_topk_logp"):
        compute_srpo_loss(
            AlgorithmConfig(variant="srpo_no_dw"), dataclasses.replace(batch, student_topk_logp=None), 4
        )
    with pytest.raises(ValueError, match="num_tokens"):
        compute_srpo_loss(AlgorithmConfig(variant="srpo_no_dw"), batch, 0)


def test_micro_batch_without_counted_tokens_still_backpropagates():
    cfg = AlgorithmConfig(variant="sdpo")
    batch = toy_batch([False, False])
    loss, _ = compute_srpo_loss(cfg, batch, 10)
    loss.backward()
    assert loss.item() == 0 and torch.equal(batch.logp.grad, torch.zeros(2, 2, dtype=torch.float64))


# ---- micro-batching: sum of micro-batch gradients == one big batch ----------------------------------


def random_batch(variant: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, LossBatch]:
    """12 rollouts (3 prompts x 4) x 6 tokens, vocab 20, top-5; one leaf `logits` feeds every student term."""
    gen = torch.Generator().manual_seed(seed)
    B, T, V, K = 12, 6, 20, 5
    cfg = AlgorithmConfig(variant=variant)
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0])  # group 2 all wrong
    groups = torch.arange(3).repeat_interleave(4)
    routing = route_rollouts(rewards, groups, cfg)
    logits = torch.randn(B, T, V, generator=gen, dtype=dtype).requires_grad_()
    logp_all = logits.log_softmax(-1)
    tokens = torch.randint(V, (B, T), generator=gen)
    logp = logp_all.gather(-1, tokens[..., None])[..., 0]
    old_logp = logp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=dtype)
    student_topk_logp, ids = logp_all.topk(K, dim=-1)
    teacher_all = (logits.detach() + torch.randn(B, T, V, generator=gen, dtype=dtype)).log_softmax(-1)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    batch = LossBatch(
        logp=logp,
        old_logp=old_logp,
        rollout_logp=old_logp + 0.3 * torch.randn(B, T, generator=gen, dtype=dtype),
        loss_mask=(torch.arange(T)[None, :] < lengths[:, None]).float(),
        advantages=compute_group_advantages(rewards, groups),
        route_sdpo=routing.route_sdpo,
        has_teacher=routing.has_teacher,
        fallback=routing.fallback,
        student_topk_logp=student_topk_logp,
        teacher_topk_logp=teacher_all.gather(-1, ids),
        teacher_entropy=-(teacher_all.exp() * teacher_all).sum(-1),
        teacher_logp=teacher_all.gather(-1, tokens[..., None])[..., 0],
    )
    return logits, batch


def slice_batch(batch: LossBatch, rows: slice) -> LossBatch:
    return LossBatch(
        **{
            f.name: getattr(batch, f.name)[rows]
            for f in dataclasses.fields(batch)
            if getattr(batch, f.name) is not None
        }
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix"])
def test_micro_batches_give_the_full_batch_gradient(variant, dtype):
    cfg = AlgorithmConfig(variant=variant)
    logits, batch = random_batch(variant, dtype)
    micro = [slice(0, 3), slice(3, 4), slice(4, 9), slice(9, 12)]
    sdpo_tokens = lambda b: b.loss_mask.bool() & b.route_sdpo[:, None]
    # The caller's reductions: global N and (S, C) summed over micro-batches (and DP ranks).
    n = sum(
        count_denominator_tokens(cfg, sb.loss_mask, sb.route_sdpo)
        for sb in map(lambda m: slice_batch(batch, m), micro)
    )
    stats = [
        compute_weight_stats(slice_batch(batch, m).teacher_entropy, sdpo_tokens(slice_batch(batch, m)), 1.0)
        for m in micro
    ]
    s, c = sum(x for x, _ in stats), sum(y for _, y in stats)
    assert n == count_denominator_tokens(cfg, batch.loss_mask, batch.route_sdpo)

    full_loss, _ = compute_srpo_loss(cfg, batch, n, s, c)
    (full_grad,) = torch.autograd.grad(full_loss, logits, retain_graph=True)
    micro_grad = torch.zeros_like(logits)
    micro_loss = 0.0
    combined = {}
    for m in micro:
        loss, metrics = compute_srpo_loss(cfg, slice_batch(batch, m), n, s, c)
        micro_grad += torch.autograd.grad(loss, logits, retain_graph=True)[0]
        micro_loss += loss.item()
        combined = {k: combined[k] + v if k in combined else v for k, v in metrics.items()}
    assert full_grad.abs().sum() > 0
    assert micro_loss == pytest.approx(full_loss.item(), abs=1e-12 if dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(micro_grad, full_grad, rtol=0, atol=1e-6)
    # the metrics of the micro-batches combine into the full batch's
    _, full_metrics = compute_srpo_loss(cfg, batch, n, s, c)
    for key, metric in full_metrics.items():
        assert value(combined[key]) == pytest.approx(value(metric), abs=1e-6), key


@pytest.mark.parametrize("variant", ["grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix"])
def test_token_major_rows_give_the_same_loss_gradient_and_metrics(variant):
    """The trainer's layout: one row per valid token ([N, 1], per-rollout fields repeated per token)."""
    cfg = AlgorithmConfig(variant=variant)
    logits, batch = random_batch(variant, torch.float64)
    valid = batch.loss_mask.bool()
    rollout_of = torch.arange(valid.shape[0])[:, None].expand_as(valid)[valid]  # [N]

    def token_major(name, tensor):
        if tensor is None:
            return None
        if name in ("advantages", "route_sdpo", "has_teacher", "fallback"):
            return tensor[rollout_of]
        return tensor[valid].unsqueeze(1)  # [N, 1, ...]

    tokens = LossBatch(
        **{f.name: token_major(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )
    n, s, c = global_stats(cfg, batch)
    loss, metrics = compute_srpo_loss(cfg, batch, n, s, c)
    token_loss, token_metrics = compute_srpo_loss(cfg, tokens, n, s, c)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (token_grad,) = torch.autograd.grad(token_loss, logits)
    assert token_loss.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(token_grad, grad, rtol=0, atol=1e-12)
    assert {k: value(v) for k, v in token_metrics.items()} == pytest.approx(
        {k: value(v) for k, v in metrics.items()}
    )
