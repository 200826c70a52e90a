import math

import torch

from srpo_megatron.algorithms.policy_loss import compute_policy_loss, compute_tis_weights


def test_clipped_surrogate_by_hand():
    # eps_low = 0.2, eps_high = 0.28, c = 3.  L1 = max(-A rho, -A clip(rho, 0.8, 1.28)); A < 0: min(L1, -3A)
    #   A=+1 rho=1.5 : max(-1.5, -1.28) = -1.28  clipped, zero gradient
    #   A=+1 rho=0.5 : max(-0.5, -0.8)  = -0.5   not clipped, dL/dlogp = -A rho = -0.5
    #   A=-1 rho=0.5 : max(0.5, 0.8)    =  0.8   clipped, zero gradient
    #   A=-1 rho=2.0 : max(2.0, 1.28)   =  2.0; min(2.0, 3) = 2.0, dL/dlogp = 2.0
    #   A=-1 rho=4.0 : max(4.0, 1.28)   =  4.0; min(4.0, 3) = 3.0 dual-clipped, zero gradient
    #   A=0  rho=1.5 : 0
    ratio = torch.tensor([[1.5, 0.5, 0.5, 2.0, 4.0, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 0.0]], dtype=torch.float64)
    old_logp = torch.full_like(ratio, -2.0)
    logp = (old_logp + ratio.log()).requires_grad_()
    loss, stats = compute_policy_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5, 0.8, 2.0, 3.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, -0.5, 0.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    )
    assert stats["clipped"].tolist() == [[True, False, True, False, False, False]]
    assert stats["dual_clipped"].tolist() == [[False, False, False, False, True, False]]


def test_tis_weights_are_truncated_and_detached():
    # pi_old / pi_roll = 3 -> min(3, 2) = 2; 0.5 -> 0.5; exp(clamp(100, 20)) -> 2; exp(-20) stays tiny
    old_logp = torch.tensor([math.log(3.0), math.log(0.5), 100.0, -100.0], requires_grad=True)
    rollout_logp = torch.zeros(4)
    w = compute_tis_weights(old_logp, rollout_logp, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 2.0, math.exp(-20.0)]))
    assert not w.requires_grad


def test_ratio_is_clamped_in_log_space():
    logp = torch.tensor([[0.0]], requires_grad=True)
    old_logp = torch.tensor([[-float("inf")]])
    loss, _ = compute_policy_loss(logp, old_logp, torch.tensor([[-1.0]]), 0.2, 0.28, 3.0)
    assert torch.isfinite(loss).all()  # exp(20) * 1, then dual clip -> 3
    torch.testing.assert_close(loss, torch.tensor([[3.0]]))
