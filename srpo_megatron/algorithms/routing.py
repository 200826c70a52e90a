"""Sample-level routing (paper sec. 3.1 and App. B.5; ALGORITHM.md sec. 1 and 7).

    c_i = 1[r_i >= success_threshold]
    m_i = 1[exists j != i in the same group with c_j = 1]        (never its own teacher)
    z_i^SDPO = (1 - c_i) * m_i,   z_i^GRPO = 1 - z_i^SDPO

correct -> GRPO; wrong with a correct sibling -> SDPO; wrong in an all-wrong group -> GRPO
("fallback", zero advantage under the mean-only advantage). The teacher sibling j is the first
correct index of the group other than i, or a uniformly random one (seeded generator).

The variants of sec. 7 change who is distilled and who needs the teacher forward:
    variant         route_sdpo (SDPO loss)     needs_teacher (teacher forward)   GRPO loss on
    grpo            none                       none                              all
    sdpo            m_i                        m_i                               none
    srpo[_no_dw]    (1 - c_i) * m_i            (1 - c_i) * m_i                   the rest
    advantage_mix   none                       m_i (A_SDPO is 0 without one)     all
"""

from dataclasses import dataclass

import torch

from srpo_megatron.algorithms.config import AlgorithmConfig


@dataclass
class Routing:
    """Per-rollout routing decisions, all [B]."""

    correct: torch.Tensor  # bool, c_i
    sibling: torch.Tensor  # int64, batch index of the teacher sibling, -1 if none
    has_teacher: torch.Tensor  # bool, m_i
    route_sdpo: torch.Tensor  # bool, rollouts that get the SDPO loss
    needs_teacher: torch.Tensor  # bool, rollouts that need the EMA-teacher forward
    fallback: torch.Tensor  # bool, wrong with no correct sibling


def compute_correctness(rewards: torch.Tensor, success_threshold: float) -> torch.Tensor:
    """c_i = r_i >= success_threshold.  [B] -> [B] bool"""
    return rewards >= success_threshold


def select_siblings(
    correct: torch.Tensor, group_ids: torch.Tensor, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batch index of a correct sibling j != i in i's group, -1 where none exists.

    Args:
        correct: [B] bool.
        group_ids: [B] integer group (prompt) id.
        mode: "first" (lowest correct index other than i) or "random" (uniform over them, drawn
            from `generator`, which must then be given so runs are reproducible).
    Returns:
        [B] int64.
    """
    if correct.shape != group_ids.shape or correct.dim() != 1:
        raise ValueError(
            f"correct and group_ids must both be [B], got {tuple(correct.shape)}, {tuple(group_ids.shape)}"
        )
    n = correct.numel()
    candidate = group_ids[:, None] == group_ids[None, :]  # [B, B]; candidate[i, j]: j may teach i
    candidate &= correct.bool()[None, :]
    candidate &= ~torch.eye(n, dtype=torch.bool, device=correct.device)
    if mode == "first":
        score = candidate.to(torch.int8)  # argmax returns the first maximal index
    elif mode == "random":
        if generator is None:
            raise ValueError("sibling selection 'random' needs a torch.Generator for reproducibility")
        score = torch.where(candidate, torch.rand(n, n, generator=generator, device=correct.device), -1.0)
    else:
        raise ValueError(f"sibling mode must be 'first' or 'random', got {mode!r}")
    choice = score.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
    return torch.where(candidate.any(dim=1), choice, -1)


def route_rollouts(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: AlgorithmConfig,
    generator: torch.Generator | None = None,
) -> Routing:
    """Correctness, sibling and route of every rollout for `cfg.variant` (see the module table)."""
    correct = compute_correctness(rewards, cfg.success_threshold)
    sibling = select_siblings(correct, group_ids, cfg.sibling, generator)
    has_teacher = sibling >= 0
    none = torch.zeros_like(correct)
    if cfg.variant == "grpo":
        route_sdpo, needs_teacher = none, none
    elif cfg.variant == "sdpo":
        route_sdpo, needs_teacher = has_teacher, has_teacher
    elif cfg.variant in ("srpo", "srpo_no_dw"):
        route_sdpo = ~correct & has_teacher
        needs_teacher = route_sdpo
    elif cfg.variant == "advantage_mix":
        route_sdpo, needs_teacher = none, has_teacher
    else:
        raise ValueError(f"unknown algorithm variant {cfg.variant!r}")
    return Routing(
        correct=correct,
        sibling=sibling,
        has_teacher=has_teacher,
        route_sdpo=route_sdpo,
        needs_teacher=needs_teacher,
        fallback=~correct & ~has_teacher,
    )
