import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_megatron.algorithms.distillation import (
    compute_distill_is_weights,
    compute_distill_loss,
    compute_tail_logp,
)

LN2 = math.log(2.0)
# K = 3 toy. Student top-3 probs [1/2, 1/4, 1/8] (tail 1/8); teacher at the same ids [1/8, 1/2, 1/4]
# (tail 1/8).  P = [1/2, 1/4, 1/8, 1/8], Q = [1/8, 1/2, 1/4, 1/8].
STUDENT = torch.tensor([[[0.5, 0.25, 0.125]]], dtype=torch.float64).log()  # [B=1, T=1, K=3]
TEACHER = torch.tensor([[[0.125, 0.5, 0.25]]], dtype=torch.float64).log()

# forward KL(Q||P) = 1/8 ln(1/4) + 1/2 ln 2 + 1/4 ln 2 + 1/8 ln 1 = (-2/8 + 1/2 + 1/4) ln 2 = 0.5 ln 2
FORWARD_KL = 0.5 * LN2
# reverse KL(P||Q) = 1/2 ln 4 + 1/4 ln(1/2) + 1/8 ln(1/2) + 0 = (1 - 1/4 - 1/8) ln 2 = 0.625 ln 2
REVERSE_KL = 0.625 * LN2
# JSD (alpha = 1/2): M = (P + Q) / 2 = [5/16, 6/16, 3/16, 2/16]
#   KL(P||M) = 1/2 ln(8/5) + 1/4 ln(2/3) + 1/8 ln(2/3) + 0                 = 0.0829524
#   KL(Q||M) = 1/8 ln(2/5) + 1/2 ln(4/3) + 1/4 ln(4/3) + 0                 = 0.1012253
#   JSD = (0.0829524 + 0.1012253) / 2                                      = 0.0920889
KL_PM = 0.5 * math.log(8 / 5) + 0.375 * math.log(2 / 3)
KL_QM = 0.125 * math.log(2 / 5) + 0.75 * math.log(4 / 3)
JSD = 0.5 * KL_PM + 0.5 * KL_QM


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, FORWARD_KL), (1.0, REVERSE_KL), (0.5, JSD)])
def test_k3_toy_with_tail(alpha, expected):
    loss = compute_distill_loss(STUDENT, TEACHER, alpha=alpha, tail_bucket=True)
    assert loss.shape == (1, 1)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert abs(JSD - 0.0920889) < 1e-7  # the decimals written in the comment above


def test_k3_toy_without_tail_renormalises():
    # P' = [4/7, 2/7, 1/7], Q' = [1/7, 4/7, 2/7]
    # KL(Q'||P') = 1/7 ln(1/4) + 4/7 ln 2 + 2/7 ln 2 = (−2 + 4 + 2)/7 ln 2 = 4/7 ln 2
    # KL(P'||Q') = 4/7 ln 4 + 2/7 ln(1/2) + 1/7 ln(1/2) = (8 − 2 − 1)/7 ln 2 = 5/7 ln 2
    forward = compute_distill_loss(STUDENT, TEACHER, alpha=0.0, tail_bucket=False)
    reverse = compute_distill_loss(STUDENT, TEACHER, alpha=1.0, tail_bucket=False)
    assert forward.item() == pytest.approx(4 / 7 * LN2, abs=1e-12)
    assert reverse.item() == pytest.approx(5 / 7 * LN2, abs=1e-12)


def test_tail_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(50, 300, generator=g, dtype=torch.float64).log_softmax(-1)[:, :20]  # [T, K]
    expected = torch.log(1 - logp.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(compute_tail_logp(logp.float()).double(), expected, rtol=0, atol=1e-5)


def test_tail_is_stable_when_topk_holds_all_mass():
    # row 0: sum = 1 up to e^-40 (log(1 - 1) would be -inf); row 1: exactly 1
    full = torch.tensor([[0.0, -40.0], [math.log(0.5), math.log(0.5)]], requires_grad=True)
    tail = compute_tail_logp(full)
    tail.sum().backward()
    assert torch.isfinite(tail).all() and torch.isfinite(full.grad).all()
    assert tail[0].item() == pytest.approx(math.log(1e-7), rel=1e-3)  # log(-expm1(-1e-7)) ~ log(1e-7)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=-20.0, max_value=5.0), min_size=2, max_size=30),
    st.integers(min_value=1, max_value=29),
)
def test_tail_and_topk_mass_sum_to_one(raw_logits, k):
    logp = torch.tensor(raw_logits, dtype=torch.float64).log_softmax(-1)
    topk_logp = logp.topk(min(k, len(raw_logits) - 1)).values
    tail = compute_tail_logp(topk_logp)
    if topk_logp.exp().sum() < 1 - 1e-6:  # otherwise the clamp is active by design
        assert (topk_logp.exp().sum() + tail.exp().sum()).item() == pytest.approx(1.0, abs=1e-9)
    assert math.isfinite(tail.item())


def test_identical_distributions_give_zero():
    for alpha in (0.0, 0.3, 0.5, 1.0):
        assert compute_distill_loss(STUDENT, STUDENT, alpha, True).item() == pytest.approx(0.0, abs=1e-12)


def test_is_weights():
    logp = torch.tensor([math.log(3.0), math.log(1.5), -30.0], requires_grad=True)
    w = compute_distill_is_weights(logp, torch.zeros(3), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5, math.exp(-20.0)]))
    assert not w.requires_grad


def full_vocab_reference(logits, teacher_logits, ids, alpha, tail_bucket):
    """The same formula written directly on probabilities over the whole vocabulary."""
    p_all, q_all = logits.softmax(-1), teacher_logits.softmax(-1)  # [T, V]
    p, q = p_all.gather(-1, ids), q_all.gather(-1, ids)  # [T, K]
    if tail_bucket:
        outside = torch.ones_like(p_all).scatter(-1, ids, 0.0)  # 1 off the top-k
        p = torch.cat([p, (p_all * outside).sum(-1, keepdim=True)], -1)
        q = torch.cat([q, (q_all * outside).sum(-1, keepdim=True)], -1)
    else:
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if alpha == 0.0:
        return (q * (q / p).log()).sum(-1)
    if alpha == 1.0:
        return (p * (p / q).log()).sum(-1)
    m = (1 - alpha) * p + alpha * q
    return (1 - alpha) * (p * (p / m).log()).sum(-1) + alpha * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("tail_bucket", [True, False])
def test_gradient_matches_full_vocab_autograd(alpha, tail_bucket):
    gen = torch.Generator().manual_seed(0)
    T, V, K = 7, 50, 5
    logits = (2.0 * torch.randn(T, V, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher_logits = 2.0 * torch.randn(T, V, generator=gen, dtype=torch.float64)
    token_weights = torch.rand(T, generator=gen, dtype=torch.float64)  # a non-uniform upstream gradient

    student_topk_logp, ids = logits.log_softmax(-1).topk(K, dim=-1)  # [T, K]
    teacher_topk_logp = teacher_logits.log_softmax(-1).gather(-1, ids)
    loss = compute_distill_loss(student_topk_logp[None], teacher_topk_logp[None], alpha, tail_bucket)[0]
    (grad,) = torch.autograd.grad((loss * token_weights).sum(), logits)

    reference = full_vocab_reference(logits, teacher_logits, ids, alpha, tail_bucket)
    (ref_grad,) = torch.autograd.grad((reference * token_weights).sum(), logits)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0


def test_teacher_gets_no_gradient():
    teacher = TEACHER.clone().requires_grad_()
    student = STUDENT.clone().requires_grad_()
    compute_distill_loss(student, teacher, 0.5, True).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        compute_distill_loss(STUDENT, TEACHER[..., :2], 0.5, True)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.0, 1.0),
    tail_bucket=st.booleans(),
    scale=st.floats(0.1, 8.0),
)
def test_divergence_is_nonnegative_and_jsd_is_bounded(seed, alpha, tail_bucket, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(4, 30, generator=gen, dtype=torch.float64)
    student, ids = logits.log_softmax(-1).topk(6, dim=-1)
    teacher = (scale * torch.randn(4, 30, generator=gen, dtype=torch.float64)).log_softmax(-1).gather(-1, ids)
    loss = compute_distill_loss(student[None], teacher[None], alpha, tail_bucket)
    assert torch.isfinite(loss).all() and (loss >= -1e-12).all()
    if 0.0 < alpha < 1.0:  # the generalised JSD is at most the binary entropy of alpha
        assert (loss <= -(alpha * math.log(alpha) + (1 - alpha) * math.log(1 - alpha)) + 1e-9).all()
