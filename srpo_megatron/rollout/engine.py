"""The rollout engine interface: what the trainer asks of SGLang (GPU) and of the HF engine (CPU).

generate: prompt token ids, ``n`` samples each -> response ids, the per-token log-probs of the
distribution each token was sampled from (temperature applied; SGLang's default, i.e. without
``SGLANG_RETURN_ORIGINAL_LOGPROB``), and a finish reason (``"stop"``: a stop token was sampled and
is the last response token; ``"length"``: ``max_new_tokens`` ran out).

Two implementations: ``HFEngine`` (hf_engine.py) and ``SGLangFleet`` (sglang_fleet.py, the run's
SGLang servers). Weights do not go through this interface: each engine has its transport in
``weight_sync/`` (a ``WeightSync``, picked where the engine is made). ``release_memory`` frees the
engine's GPU memory for training where the engine supports it (SGLang colocated, whose weight sync
brings it back); elsewhere it does nothing. ``shutdown`` ends what the engine started (the servers
a fleet launched).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one ``generate`` call (the same for every prompt)."""

    n: int = 1
    """samples per prompt"""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    """generation of a sample ends after any of these ids (usually the EOS / end-of-turn ids)"""
    seed: int | None = None
    """same seed, same weights, same prompts -> same samples (HF engine; SGLang best effort)"""
    record_routes: bool = False
    """a mixture-of-experts model: return the experts each token was routed to (``RolloutBatch.routed_experts``)"""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy is temperature -> 0), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutBatch:
    """``B * n`` samples, grouped by prompt: sample ``i`` answers prompt ``prompt_index[i]``
    (samples of one prompt are consecutive)."""

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logp: list[torch.Tensor]  # each [len(response_ids[i])], fp32
    finish_reasons: list[FinishReason]
    # ``record_routes``: per sample [len(prompt) + len(response), MoE layers, k] int16, the experts the
    # router chose at each position it read (-1 at the response's last token, which it never reads)
    routed_experts: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def __post_init__(self):
        sizes = {
            len(self.prompt_index),
            len(self.prompt_ids),
            len(self.response_ids),
            len(self.rollout_logp),
            len(self.finish_reasons),
        }
        assert len(sizes) == 1, f"ragged RolloutBatch fields: {sizes}"
        for ids, logp in zip(self.response_ids, self.rollout_logp, strict=True):
            assert len(ids) == logp.numel(), (len(ids), logp.shape)
        if self.routed_experts is not None:
            for prompt, response, routes in zip(
                self.prompt_ids, self.response_ids, self.routed_experts, strict=True
            ):
                assert routes.shape[0] == len(prompt) + len(response), (
                    routes.shape,
                    len(prompt),
                    len(response),
                )


class RolloutEngine(Protocol):
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_done: Callable[[int], None] | None = None,
    ) -> RolloutBatch:
        """``on_done(k)``: k more samples are finished (progress of a long call, e.g. evaluation)."""
        ...

    def release_memory(self) -> None: ...

    def shutdown(self) -> None: ...
