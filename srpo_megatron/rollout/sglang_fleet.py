"""The run's SGLang engines, driven from global rank 0: the ``RolloutEngine`` of ``rollout.engine=
sglang``. It generates across them, opens and closes their weight-update sessions, hands them the
colocated weight payloads, and frees their GPU memory while the actor trains (colocated).

Two placements (``rollout.mode``), each with its weight transport in ``weight_sync/``:

- colocated: the engines share the training GPUs, engine ``i`` on the GPUs of global ranks
  ``[i * tp, (i + 1) * tp)``. They are launched with the memory saver; after each generation their
  weights, KV cache and CUDA graphs are released, so training has the GPUs, and before the next
  generation the weights come back (stale), the new ones are loaded, then the KV cache
  (``weight_sync/cuda_ipc.py``: engine rank ``j`` gets CUDA IPC handles made on its own GPU,
  ``load_serialized``). Per step::

      generate -> release_memory() -> ... train ... -> resume_weights() -> begin_weight_update()
      -> load_serialized() per bucket -> end_weight_update() -> resume_rest()

- disaggregated: the engines have GPUs of their own and keep their memory; each pipeline stage's
  source rank broadcasts its layers to them in a weight-update group of its own, inside the
  sessions this fleet opens (``weight_sync/broadcast.py``).

Generation splits the prompts into contiguous shares, one per engine, run concurrently (each
engine's HTTP calls go through its own worker thread), and concatenates the results in prompt order.
"""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from srpo_megatron.rollout.engine import RolloutBatch, SamplingParams
from srpo_megatron.rollout.sglang_engine import MEMORY_TAGS, WEIGHTS_TAG, EngineError, SGLangEngine
from srpo_megatron.rollout.sglang_server import ServerProcess

CLEANUP_TIMEOUT_S = 30.0


class SGLangFleet:
    """engines: one ``SGLangEngine`` per replica. servers: the processes this fleet launched
    (stopped by ``shutdown``)."""

    def __init__(
        self,
        engines: Sequence[SGLangEngine],
        *,
        colocated: bool,
        servers: Sequence[ServerProcess] = (),
        deterministic: bool = False,
        routed_experts: bool = False,
    ):
        if not engines:
            raise ValueError("SGLangFleet needs at least one engine")
        self.engines = list(engines)
        self.colocated = colocated
        self.servers = list(servers)
        self.deterministic = deterministic
        self.routed_experts = routed_experts
        self._released: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="fleet")

    def connect(self) -> None:
        """Once per run. Each server must run with the flags this run needs (servers started by
        someone else may lack them), and may hold a weight-update session that a crashed run left
        open: closed quietly."""
        for engine in self.engines:
            self._check_server_args(engine)
        if not self.servers:
            self._end(self.engines, quiet=True)

    def _check_server_args(self, engine: SGLangEngine) -> None:
        """Refuse servers that would quietly do something else than asked: without the memory saver
        SGLang's release_memory_occupation succeeds and frees nothing (colocated training would
        then run out of GPU memory, or share it with a full engine; a CPU server, which has none
        to free and cannot run the memory saver, is not asked for it), and without deterministic
        inference it ignores the requests' sampling seeds (resumed runs would sample otherwise), and
        without the routed-experts capture it returns no routes for routing replay."""
        info = engine.server_info()
        needed = [("tp_size", engine.world_size, f"--tp-size {engine.world_size}", "rollout.engine_tp")]
        if self.colocated and info.get("device") != "cpu":  # a CPU server has no GPU memory to free
            needed.append(("enable_memory_saver", True, "--enable-memory-saver", "rollout.mode=colocated"))
        if self.deterministic:
            needed.append(
                (
                    "enable_deterministic_inference",
                    True,
                    "--enable-deterministic-inference",
                    "rollout.deterministic",
                )
            )
        if self.routed_experts:
            needed.append(
                (
                    "enable_return_routed_experts",
                    True,
                    "--enable-return-routed-experts",
                    "algorithm.routing_replay=rollout",
                )
            )
        for key, want, flag, why in needed:
            if info.get(key) != want:
                raise EngineError(
                    f"engine {engine.name!r} runs with {key}={info.get(key)!r}: start it with {flag} ({why})"
                )

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_done: Callable[[int], None] | None = None,
    ) -> RolloutBatch:
        """``on_done`` hears as each engine's share comes back (one request per engine)."""
        shares = _split(len(prompt_ids), len(self.engines))
        futures = [
            (
                start,
                self._pool.submit(
                    engine.generate, [prompt_ids[i] for i in range(start, stop)], params, first_prompt=start
                ),
            )
            for engine, (start, stop) in zip(self.engines, shares, strict=True)
            if stop > start
        ]
        if on_done is not None:
            for future in as_completed(f for _, f in futures):
                on_done(len(future.result()))
        parts = [(start, future.result()) for start, future in futures]
        return RolloutBatch(
            prompt_index=[start + i for start, part in parts for i in part.prompt_index],
            prompt_ids=[p for _, part in parts for p in part.prompt_ids],
            response_ids=[r for _, part in parts for r in part.response_ids],
            rollout_logp=[lp for _, part in parts for lp in part.rollout_logp],
            finish_reasons=[f for _, part in parts for f in part.finish_reasons],
            routed_experts=[r for _, part in parts for r in part.routed_experts]
            if params.record_routes
            else None,
        )

    # -- weights ---------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        """Open a weight-update session on every engine (SGLang refuses loads outside one)."""
        opened = []
        try:
            for engine in self.engines:
                engine.begin_weight_update()
                opened.append(engine)
        except Exception:
            self._end(opened, quiet=True)
            raise

    def end_weight_update(self, *, flush: bool = True, quiet: bool = False) -> None:
        """Close the sessions; flush the KV caches computed with the old weights. quiet: after a
        failed load, when the first error is the one to report."""
        self._end(self.engines, quiet=quiet)
        if flush:
            self.flush_cache()

    @staticmethod
    def _end(engines, quiet: bool) -> None:
        """End every engine's session (an engine left with one refuses the next begin), then raise
        the first error unless quiet (clean-up after a failed load: that error is the one to report,
        and a stuck engine gets a short deadline)."""
        errors = []
        for engine in engines:
            try:
                engine.end_weight_update(timeout_s=CLEANUP_TIMEOUT_S if quiet else None)
            except Exception as e:
                errors.append(e)
        if errors and not quiet:
            raise errors[0]

    def load_serialized(self, payloads: Sequence[str]) -> None:
        """Colocated: one bucket as one ``serialize_tensors`` payload per GPU, in global-rank order;
        engine ``i`` takes those of GPUs ``[i * tp, (i + 1) * tp)``, its own. Call it between
        ``begin_weight_update`` and ``end_weight_update``."""
        tp = self.engines[0].world_size
        if len(payloads) != tp * len(self.engines):
            raise ValueError(f"{len(payloads)} payloads for {len(self.engines)} engines x TP {tp}")
        shares = [payloads[i * tp : (i + 1) * tp] for i in range(len(self.engines))]
        futures = [
            self._pool.submit(e.update_weights_serialized, p)
            for e, p in zip(self.engines, shares, strict=True)
        ]
        for future in futures:
            future.result()

    def flush_cache(self) -> None:
        self._each(lambda e: e.flush_cache())

    # -- memory (colocated) ----------------------------------------------------------------------
    def release_memory(self) -> None:
        """Colocated: weights, KV cache and CUDA graphs off the GPUs (elsewhere: nothing)."""
        if self.colocated and not self._released:
            self._each(lambda e: e.release_memory(list(MEMORY_TAGS)))
            self._released = set(MEMORY_TAGS)

    def resume_weights(self) -> None:
        self._resume([WEIGHTS_TAG])

    def resume_rest(self) -> None:
        """KV cache and CUDA graphs, after the new weights are in."""
        self._resume([t for t in MEMORY_TAGS if t != WEIGHTS_TAG])

    def _resume(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self._released]  # a fresh engine has released nothing
        if tags:
            self._each(lambda e: e.resume_memory(tags))
            self._released -= set(tags)

    def shutdown(self) -> None:
        """Stop the adapters' workers and the servers this fleet launched (after the weight sync's
        ``close``: disaggregated engines leave their weight-update groups first)."""
        try:
            for engine in self.engines:
                engine.shutdown()
        finally:
            for server in self.servers:
                server.stop()
            self._pool.shutdown(wait=False)

    def _each(self, call) -> None:
        for future in [self._pool.submit(call, e) for e in self.engines]:
            future.result()


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` contiguous shares of ``range(n)``, sizes differing by at most 1."""
    bounds = [n * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
