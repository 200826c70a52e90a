import math

import pytest
import torch

from srpo_megatron.algorithms.advantages import compute_group_advantages

# 2 prompts x 4 rollouts.
#   prompt 0: rewards [1, 0, 0, 1], mean 0.5  -> A = [+0.5, -0.5, -0.5, +0.5]
#             unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735 -> A / std = +-0.5 * sqrt(3) = +-0.866025
#   prompt 1: rewards [1, 0, 0, 0], mean 0.25 -> A = [+0.75, -0.25, -0.25, -0.25]
#             unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5 -> A / std = [1.5, -0.5, -0.5, -0.5]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_mean_only_advantages():
    adv = compute_group_advantages(REWARDS, GROUPS)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25])
    torch.testing.assert_close(adv, expected)


def test_std_normalised_advantages():
    adv = compute_group_advantages(REWARDS, GROUPS, std_norm=True)
    s3 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor(
        [s3, -s3, -s3, s3, 0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]
    )
    torch.testing.assert_close(adv, expected)


def test_group_order_does_not_matter():
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    ids = torch.tensor([10, 42, 10, 42, 42, 10, 42, 10])  # arbitrary, interleaved ids
    rewards = torch.zeros(8)
    rewards[ids == 10] = REWARDS[:4]
    rewards[ids == 42] = REWARDS[4:]
    adv = compute_group_advantages(rewards[perm], ids[perm])
    expected = compute_group_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv.sort().values, expected.sort().values)
    torch.testing.assert_close(adv, rewards[perm] - torch.where(ids[perm] == 10, 0.5, 0.25))


def test_all_wrong_group_has_zero_advantage():
    adv = compute_group_advantages(torch.zeros(4), torch.zeros(4, dtype=torch.long), std_norm=True)
    assert torch.equal(adv, torch.zeros(4))


def test_singleton_group_uses_mean_zero_std_one():
    adv = compute_group_advantages(torch.tensor([1.0, 0.3, 0.5]), torch.tensor([7, 8, 8]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.1, 0.1]))
    adv = compute_group_advantages(torch.tensor([1.0]), torch.tensor([0]), std_norm=True)
    torch.testing.assert_close(adv, torch.tensor([1.0 / (1.0 + 1e-6)]))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        compute_group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
