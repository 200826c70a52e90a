import math

import pytest
import torch

from srpo_megatron.algorithms.weighting import compute_entropy_weights, compute_weight_stats


def test_weights_by_hand():
    # H = [0, ln 2, ln 4], beta = 1 -> w~ = [1, 1/2, 1/4], mean 7/12 -> w = [12/7, 6/7, 3/7], mean 1
    entropy = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    s, c = compute_weight_stats(entropy, mask, beta=1.0)
    assert s.item() == pytest.approx(1.75) and c.item() == 3
    w = compute_entropy_weights(entropy, 1.0, s, c)
    torch.testing.assert_close(w, torch.tensor([[12 / 7, 6 / 7, 3 / 7]]))


def test_weights_average_exactly_one_over_sdpo_tokens_across_micro_batches():
    gen = torch.Generator().manual_seed(0)
    entropy = 3.0 * torch.rand(6, 9, generator=gen, dtype=torch.float64)  # [B, T]
    mask = torch.rand(6, 9, generator=gen) < 0.6  # SDPO tokens; the rest are ignored
    micro = [slice(0, 1), slice(1, 4), slice(4, 6)]
    stats = [compute_weight_stats(entropy[m], mask[m], beta=2.0) for m in micro]
    total_sum = sum(s for s, _ in stats)
    total_count = sum(c for _, c in stats)
    whole = compute_weight_stats(entropy, mask, beta=2.0)
    assert total_sum.item() == pytest.approx(whole[0].item(), rel=1e-12) and total_count == whole[1]
    w = torch.cat([compute_entropy_weights(entropy[m], 2.0, total_sum, total_count) for m in micro])
    assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-12)
    assert not w.requires_grad


def test_empty_sdpo_set_raises():
    with pytest.raises(ValueError, match="weight_count"):
        compute_entropy_weights(torch.zeros(1, 2), 1.0, 0.0, 0.0)
