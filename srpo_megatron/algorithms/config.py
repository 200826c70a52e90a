"""Typed configuration of the SRPO algorithm family (ALGORITHM.md sec. 3-7, paper Table 3).

One plain dataclass; the trainer's OmegaConf schema embeds it. `validate()` is called once at
start and raises `ValueError` with a message naming the field.
"""

from dataclasses import dataclass
from typing import Literal

Variant = Literal["grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix"]
VARIANTS: tuple[str, ...] = ("grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix")
ROUTING_REPLAY: tuple[str, ...] = ("none", "rollout", "old")


@dataclass
class AlgorithmConfig:
    variant: Variant = "srpo"
    """Which objective (ALGORITHM.md sec. 7): grpo | sdpo | srpo | srpo_no_dw | advantage_mix."""

    success_threshold: float = 0.5
    """A rollout is correct iff its reward >= this value."""
    sibling: Literal["first", "random"] = "first"
    """Which correct sibling is the teacher information: the first correct index (self excluded) or a
    uniformly random one (seeded generator)."""

    adv_std_norm: bool = False
    """Divide the group-centred reward by (unbiased std + 1e-6). Off = Dr. GRPO (the default)."""
    clip_low: float = 0.2
    """PPO clip: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip-higher (DAPO): the ratio is clipped above at 1 + clip_high."""
    dual_clip: float = 3.0
    """Dual clip for negative advantages: the token loss is at most -A * dual_clip. Must be > 1."""
    tis_cap: float = 2.0
    """Truncated importance weight cap C between trainer (old) and rollout log-probs."""
    # No KL penalty to a reference policy and no entropy bonus: the paper trains without them (its
    # KL coefficient is 0 for every method, Table 3), and a reference policy would hold one more
    # model copy on every GPU. ``algorithm.kl_coef`` / ``entropy_coef`` are refused as unknown keys.

    topk: int = 100
    """K: the student's top-K vocabulary ids that support the distillation divergence."""
    jsd_alpha: float = 0.5
    """Generalised JSD mixing: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher)."""
    tail_bucket: bool = True
    """Add the K+1-th bucket holding 1 - sum of the top-K probabilities; off = renormalise top-K."""
    distill_is_cap: float = 2.0
    """Cap on the (detached) importance ratio pi_theta / pi_old that scales the distillation loss."""
    ema_decay: float = 0.05
    """EMA teacher update rate: theta_T <- (1 - ema_decay) * theta_T + ema_decay * theta_S."""
    entropy_beta: float = 1.0
    """Entropy-aware weighting w~ = exp(-beta * H_teacher) (srpo only)."""

    mix_lambda: float = 0.9
    """advantage_mix: A = lambda * A_GRPO + (1 - lambda) * A_SDPO."""
    teacher_max_prompt_len: int = 10240
    """Teacher prompt tokens kept (right-truncated) before the student's response ids."""

    routing_replay: Literal["none", "rollout", "old"] = "none"
    """A mixture-of-experts student's routing (trainer/expert_routes.py): none = the live router in
    every pass; rollout = the old-log-prob and training passes replay the experts the rollout engine
    chose ("R3"); old = the training passes replay the old-log-prob pass's choice. The EMA teacher
    always routes live."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.variant not in VARIANTS:
            raise ValueError(f"algorithm.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.sibling not in ("first", "random"):
            raise ValueError(f"algorithm.sibling must be 'first' or 'random', got {self.sibling!r}")
        if not 0.0 <= self.success_threshold <= 1.0:
            raise ValueError(f"algorithm.success_threshold must be in [0, 1], got {self.success_threshold}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"algorithm.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"algorithm.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip <= 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 (it bounds -A * ratio), got {self.dual_clip}")
        for name in ("tis_cap", "distill_is_cap"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"algorithm.{name} must be > 0, got {getattr(self, name)}")
        if self.entropy_beta < 0.0:
            raise ValueError(f"algorithm.entropy_beta must be >= 0, got {self.entropy_beta}")
        if self.topk < 1:
            raise ValueError(f"algorithm.topk must be >= 1, got {self.topk}")
        if not 0.0 <= self.jsd_alpha <= 1.0:
            raise ValueError(f"algorithm.jsd_alpha must be in [0, 1], got {self.jsd_alpha}")
        if not 0.0 < self.ema_decay <= 1.0:
            raise ValueError(f"algorithm.ema_decay must be in (0, 1], got {self.ema_decay}")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"algorithm.mix_lambda must be in [0, 1], got {self.mix_lambda}")
        if self.routing_replay not in ROUTING_REPLAY:
            raise ValueError(
                f"algorithm.routing_replay must be one of {ROUTING_REPLAY}, got {self.routing_replay!r}"
            )
        if self.teacher_max_prompt_len < 1:
            raise ValueError(
                f"algorithm.teacher_max_prompt_len must be >= 1, got {self.teacher_max_prompt_len}"
            )

    @property
    def uses_teacher(self) -> bool:
        """Whether this variant needs the EMA teacher forward at all."""
        return self.variant != "grpo"

    @property
    def uses_dynamic_weighting(self) -> bool:
        """Whether SDPO tokens are weighted by exp(-beta * H_teacher) / global mean."""
        return self.variant == "srpo"
