"""Deterministic shuffled prompt batches with a resumable position.

Epoch e visits the prompts in the order numpy.random.default_rng([seed, e]).permutation(n);
batches are consecutive slices of that order and never span two epochs (the last n % batch_size
prompts of an epoch are skipped that epoch, and are at other positions in the next). The
position (epoch, index) is all the state there is, so a run resumed from `state_dict()` sees
exactly the batches the uninterrupted run would have seen.
"""

from typing import Any

import numpy as np

from srpo_megatron.data.templating import TokenizedPrompt
from srpo_megatron.errors import UserError


class PromptDataset:
    """Prompts for training: `next_batch()` returns `batch_size` of them, shuffled by seed."""

    def __init__(self, prompts: list[TokenizedPrompt], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(prompts) < batch_size:
            raise ValueError(f"{len(prompts)} prompts cannot fill one batch of {batch_size}")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # position of the next batch's first prompt in this epoch's order
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self) -> list[TokenizedPrompt]:
        if self.index + self.batch_size > len(self.prompts):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        picked = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return [self.prompts[i] for i in picked]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; UserError if the data or the batching changed."""
        for key in ("seed", "num_prompts", "batch_size", "shuffle"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise UserError(
                    f"cannot resume the prompt order: checkpoint has {key}={state.get(key)!r}, this run has {mine!r}"
                )
        if not 0 <= state["index"] <= len(self.prompts) or state["epoch"] < 0:
            raise ValueError(f"invalid dataset position epoch={state['epoch']} index={state['index']}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
