import pytest
import torch

from srpo_megatron.rollout.metrics import logp_gap


def test_gap_counts_only_masked_tokens():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    rollout = torch.tensor([[-1.1, -2.0, -5.0], [-0.2, -0.5, -0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    gap = logp_gap(train, rollout, mask)
    assert gap.num_tokens == 4
    assert gap.mean == pytest.approx((0.1 + 0 + 0.3 + 0) / 4)
    assert gap.max_abs == pytest.approx(0.3)
    assert gap.as_metrics() == {"rollout/logp_gap_mean": gap.mean, "rollout/logp_gap_max": gap.max_abs}
    assert logp_gap(train, rollout, torch.zeros_like(mask)).mean == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logp_gap(train, rollout[:, :2], mask)
