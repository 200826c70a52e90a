"""Verifiable rewards: science multiple choice and tool use, selected by `data_source`."""

from srpo_megatron.rewards.registry import RewardFn, get_reward_fn, known_data_sources
from srpo_megatron.rewards.result import RewardResult
from srpo_megatron.rewards.science_mcq import score_science_mcq
from srpo_megatron.rewards.tool_use import score_tool_use

__all__ = [
    "RewardFn",
    "RewardResult",
    "get_reward_fn",
    "known_data_sources",
    "score_science_mcq",
    "score_tool_use",
]
