"""Where each step's rollouts come from, and which weights sampled them (``train.async_rollouts``).

Weights after step j: v_j (v_0: the start). The policy version of a batch is the j of the weights
v_j the engines held when it was generated; its staleness at step k is (k - 1) - j, the updates
between those weights and v_{k-1}, the policy the step trains from (pi_old, recomputed by the actor).

Synchronous (the default): step k draws its prompts, the engines generate with v_{k-1} (staleness
0), the actor trains to v_k, v_k goes to the engines.

One step off policy (``train.async_rollouts=true``; disaggregated engines, which have devices of
their own)::

    step k   take batch k, generated during step k-1 by v_{k-2}        (staleness 1)
             draw step k+1's prompts; rank 0 submits their generation on a thread of its own
             train on batch k: v_{k-1} -> v_k                           (the engines generate)
             wait for batch k+1 (every rank receives it), then push v_k to the engines

Step k+1's generation is requested before step k trains; no weight update races a generation; v_k
reaches the engines before step k+2's generation is submitted. Step 1 has nothing in hand and
generates with v_0 (staleness 0), as does the step after a resume from a checkpoint that holds no
batch (one saved after the last step, or by a synchronous run). A batch older than one update is
an error. The old log-probs are the actor's, the rollout log-probs the engine's, and the TIS
weight min(pi_old / pi_rollout, C) corrects the gap (``is/tis_mean``, ``is/tis_capped_frac``).

A checkpoint after step k holds batch k+1 (received before the sync, so it exists whenever the
checkpoint does): its prompts' dataset position, the ``RolloutBatch`` and its version
(``state_dict``, written as ``checkpoint.AHEAD_FILE``). It cannot be regenerated on resume: v_{k-1}
is not in the checkpoint. The dataset position saved with it is after step k+1's prompts.
"""

import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.rollout.engine import RolloutBatch
from srpo_megatron.runtime.distributed import from_rank_0
from srpo_megatron.trainer.metrics import PhaseTimer
from srpo_megatron.trainer.rollouts import generate_rollouts, sample_rollouts


@dataclass
class _Ahead:
    """A batch generated before its step: on every rank once received."""

    step: int
    rows: list  # the step's TokenizedPrompts
    rows_from: dict  # the dataset's position before they were drawn
    version: int
    batch: RolloutBatch | None = None  # None while in flight
    future: Future | None = None  # rank 0, while in flight


class RolloutSource:
    """The step's rollouts (``take``) and the weights the engines hold (``push_weights``), on every
    rank. ``engine`` and ``dataset`` are the run's; the engine exists on global rank 0 only."""

    def __init__(self, cfg: Config, tokenizer, dataset, engine, weight_sync):
        self.cfg, self.tokenizer, self.dataset = cfg, tokenizer, dataset
        self.engine, self.weight_sync = engine, weight_sync
        self.ahead = cfg.train.async_rollouts
        self.engine_version = 0  # j of the v_j the engines hold
        self._next: _Ahead | None = None

    def take(self, step: int) -> tuple[list, RolloutBatch, dict[str, float]]:
        """Step ``step``'s prompts, rollouts and version metrics (async runs; in synchronous ones
        only a stale batch, from an async run's checkpoint, logs them). Async: then submits step
        ``step + 1``'s generation, unless ``step`` is the last."""
        if self._next is not None:
            if self._next.batch is None or self._next.step != step:
                raise RuntimeError(
                    f"step {step}: the batch in hand is step {self._next.step}'s, or in flight"
                )
            rows, batch, version = self._next.rows, self._next.batch, self._next.version
            self._next = None
        else:
            rows = self.dataset.next_batch()
            batch = generate_rollouts(
                self.engine, self.cfg, self.tokenizer, rows, seed=self.cfg.train.seed + step
            )
            version = self.engine_version
        staleness = step - 1 - version
        if not 0 <= staleness <= 1:
            raise RuntimeError(
                f"step {step} would train on rollouts of policy version {version} (v_{step - 1} is trained)"
            )
        if self.ahead and step < self.cfg.train.total_steps:
            self._submit(step + 1)
        if not (self.ahead or staleness):
            return rows, batch, {}
        return rows, batch, {"rollout/policy_version": version, "rollout/staleness": staleness}

    def _submit(self, step: int) -> None:
        rows_from = self.dataset.state_dict()
        rows = self.dataset.next_batch()  # every rank: the same draws as a synchronous run's
        future = None
        if dist.get_rank() == 0:
            # a daemon thread: the fleet's HTTP calls block it alone, and a run that stops with a
            # generation in flight does not wait for it
            future = Future()
            seed = self.cfg.train.seed + step

            def generate() -> None:
                try:
                    future.set_result(sample_rollouts(self.engine, self.cfg, self.tokenizer, rows, seed=seed))
                except BaseException as err:  # raised on every rank by from_rank_0 in _receive
                    future.set_exception(err)

            threading.Thread(target=generate, name="rollouts-ahead", daemon=True).start()
        self._next = _Ahead(step, rows, rows_from, self.engine_version, future=future)

    def push_weights(self, model, hf_config: dict, version: int, timer: PhaseTimer | None = None) -> dict:
        """Every rank: ``model`` (v_``version``) to the engines, after the generation in flight,
        which every rank then holds (a weight update never races a generation). Returns the sync's
        metrics; ``timer`` gets ``rollout_wait`` (async) and ``sync``."""
        timer = timer or PhaseTimer()
        if self._next is not None and self._next.batch is None:
            with timer("rollout_wait"):
                future = self._next.future
                self._next.batch = from_rank_0(lambda: future.result(), "rollout generation")
                self._next.future = None
        with timer("sync"):
            metrics = self.weight_sync.sync(model, hf_config)
        self.engine_version = version
        return metrics

    def state_dict(self) -> dict | None:
        """The batch in hand for the next step (async, after a step's sync), else None."""
        if self._next is None:
            return None
        n = self._next
        return {"step": n.step, "rows_from": n.rows_from, "version": n.version, "batch": asdict(n.batch)}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        """After the checkpoint of step ``step`` (and its dataset position) is loaded: the batch it
        holds becomes step ``step + 1``'s, its prompts drawn again from their saved position."""
        if state is None:
            return
        if state["step"] != step + 1:
            raise RuntimeError(f"checkpoint of step {step} holds the rollouts of step {state['step']}")
        after = self.dataset.state_dict()
        self.dataset.load_state_dict(state["rows_from"])
        rows = self.dataset.next_batch()
        if self.dataset.state_dict() != after:
            raise RuntimeError(
                f"checkpoint of step {step}: the saved batch's prompts end at another position"
            )
        self._next = _Ahead(
            step + 1, rows, state["rows_from"], state["version"], RolloutBatch(**state["batch"])
        )
