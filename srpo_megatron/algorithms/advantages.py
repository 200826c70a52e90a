"""Group-relative advantages (paper sec. 2.1; ALGORITHM.md sec. 3).

    A_i = r_i - mean_{j in g(i)} r_j                      (Dr. GRPO, the default)
    A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + 1e-6)   (std_norm=True)

std is the unbiased (n - 1) standard deviation; a group of size 1 uses mean 0 and std 1, so its
advantage is its raw reward. Every valid token of rollout i then carries A_i.
"""

import torch

STD_EPS = 1e-6


def compute_group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_norm: bool = False
) -> torch.Tensor:
    """Per-rollout group-relative advantages.

    Args:
        rewards: [B] float outcome rewards.
        group_ids: [B] integer id of each rollout's prompt group (any order, any group sizes).
        std_norm: divide by the group's unbiased std + 1e-6.
    Returns:
        [B] float32 advantages (no grad).
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    rewards = rewards.detach().float()
    _, group = torch.unique(group_ids, return_inverse=True)  # [B] dense ids 0..num_groups-1
    num_groups = int(group.max()) + 1 if group.numel() else 0
    size = rewards.new_zeros(num_groups).index_add_(0, group, torch.ones_like(rewards))  # [num_groups]
    total = rewards.new_zeros(num_groups).index_add_(0, group, rewards)
    mean = torch.where(size > 1, total / size, 0.0)  # singleton groups: mean 0
    centred = rewards - mean[group]  # [B]
    if not std_norm:
        return centred
    sq = rewards.new_zeros(num_groups).index_add_(0, group, centred**2)
    std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), 1.0)  # singleton groups: std 1
    return centred / (std[group] + STD_EPS)
