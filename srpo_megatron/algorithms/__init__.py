"""SRPO algorithm math: pure tensor code, no torch.distributed, no megatron (ALGORITHM.md sec. 1-7).

    config.py        AlgorithmConfig: variant and every hyper-parameter, validate()
    advantages.py    group-relative advantages (mean-only, optional std)
    routing.py       correctness, correct-sibling selection, GRPO / SDPO routes per variant
    policy_loss.py   clipped surrogate (clip-higher, dual clip), truncated IS weights
    distillation.py  generalised JSD over the student's top-K (+ tail bucket), IS clip
    weighting.py     entropy-aware weights exp(-beta H) / global mean
    objective.py     the SRPO objective: branches, variants, global denominator, metrics

Teacher prompts (tokenizer-level) live in `srpo_megatron.data.teacher_prompt`.
"""

from srpo_megatron.algorithms.advantages import compute_group_advantages
from srpo_megatron.algorithms.config import AlgorithmConfig
from srpo_megatron.algorithms.objective import LossBatch, compute_srpo_loss, count_denominator_tokens
from srpo_megatron.algorithms.routing import Routing, route_rollouts
from srpo_megatron.algorithms.weighting import compute_weight_stats

__all__ = [
    "AlgorithmConfig",
    "LossBatch",
    "Routing",
    "compute_group_advantages",
    "compute_srpo_loss",
    "compute_weight_stats",
    "count_denominator_tokens",
    "route_rollouts",
]
