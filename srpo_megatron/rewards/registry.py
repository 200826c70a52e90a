"""Reward functions by `data_source` (the column of every prompt row that selects the verifier)."""

from collections.abc import Callable
from functools import partial

from srpo_megatron.rewards.result import RewardResult
from srpo_megatron.rewards.science_mcq import score_science_mcq
from srpo_megatron.rewards.tool_use import InputParser, score_tool_use

RewardFn = Callable[[str, str], RewardResult]
"""reward_fn(response_text, ground_truth) -> RewardResult; never raises on the response."""

# The SDPO data name every science domain "sciknoweval"; the domain names are accepted too so a
# user may tag rows by domain. "synthetic_mcq" is the tiny CPU task (data/synthetic.py).
_SCIENCE_SOURCES = (
    "sciknoweval",
    "chemistry",
    "physics",
    "biology",
    "material",
    "materials",
    "synthetic_mcq",
)
_TOOL_USE_SOURCES = ("tooluse", "tool_use", "toolalpaca")


def known_data_sources() -> tuple[str, ...]:
    return _SCIENCE_SOURCES + _TOOL_USE_SOURCES


def get_reward_fn(data_source: str, *, tool_use_parser: InputParser = "balanced") -> RewardFn:
    """The verifier for `data_source` (case-insensitive).

    tool_use_parser: "balanced" (default) or "reference" (SDPO's non-greedy parser, to reproduce
    published tool-use numbers); ignored for science sources.
    """
    key = data_source.strip().lower() if isinstance(data_source, str) else data_source
    if key in _SCIENCE_SOURCES:
        return score_science_mcq
    if key in _TOOL_USE_SOURCES:
        if tool_use_parser not in ("balanced", "reference"):
            raise ValueError(f"tool_use_parser must be 'balanced' or 'reference', got {tool_use_parser!r}")
        return partial(score_tool_use, parser=tool_use_parser)
    raise ValueError(
        f"no reward function for data_source {data_source!r}; known: {', '.join(known_data_sources())}"
    )


def check_reward_fn(row) -> None:
    """A check for ``data.load_rows``: the ValueError above for a row whose data_source has no verifier."""
    get_reward_fn(row.data_source)
