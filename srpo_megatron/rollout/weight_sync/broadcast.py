"""Disaggregated weight sync: each pipeline stage's source rank broadcasts its own layers to the
SGLang engines in a weight-update group of its own (``BroadcastWeightSync``).

The protocol is SGLang's (read in the sglang 0.5.23 wheel: ``srt/model_executor/
model_runner_components/weight_updater.py`` ``init_weights_update_group`` /
``receive_weights_from_distributed`` / ``destroy_weights_update_group``, and
``srt/utils/common.py`` ``init_custom_process_group``):

1. join: the engine is asked to ``init_weights_update_group(master_address, master_port,
   rank_offset, world_size, group_name, backend)``; each of its TP ranks joins a *new* process group
   (its own TCP rendezvous at ``master_address:master_port``, keys under ``group_name``) as rank
   ``rank_offset + tp_rank``. The trainer's sending rank joins the same rendezvous as rank 0, so
   ``world_size = 1 + sum(engine TP sizes)`` and replica ``r`` gets ``rank_offset = 1 + r * tp``.
   Each engine rank builds its process group inside that request, and the sender builds its own
   while the requests are pending: gloo connects in the group's constructor, so a sender that
   waited for the answers first would wait for engines that wait for it; NCCL (no ``device_id``)
   connects at the first broadcast on every side.
2. per bucket: the engine is asked to ``update_weights_from_distributed(names, dtypes, shapes,
   group_name, flush_cache, load_format="flattened_bucket")``; every engine rank allocates the
   tensors, receives ONE broadcast from group rank 0 into their concatenated bytes, rebuilds them
   (``buckets.unflatten_bucket``) and calls ``model.load_weights`` by HF name. Without
   ``load_format`` it is one broadcast per tensor (the baseline of ``benchmarks/weight_sync.py``).
   The request returns ``(success, message)`` once the bucket is loaded.
3. leave, at the end of the run: ``destroy_weights_update_group(group_name)``.

Pipeline parallelism, as slime does it: each PP stage's source rank (TP rank 0, DP rank 0: where
the exporter yields that stage's tensors) hosts a group of its own, ``f"{group_name}_pp{stage}"``
at its own address and port, reaches every engine over HTTP itself (an ``SGLangEngine`` per URL)
and sends its own layers; every engine joins one group per stage (SGLang keeps its groups by
name). Nothing funnels through one rank, and no rank holds more than two flat buckets. An engine
serves update requests one at a time, so the stages take turns at each engine while their senders
prepare the next bucket. On CPU/gloo at PP=2 this takes about half the time of funnelling stage
1 through rank 0 (``benchmarks/weight_sync.py``: ratio 0.43 to 0.57). Global rank 0 holds the
fleet and opens and closes every engine's weight-update session around the stages' sends.

``BroadcastWeightReceiver`` is the engine side of that protocol in plain torch: the CPU/gloo tests
and the stand-in server (``testing/fake_sglang_server.py``) run it in front of an HF model, which
is how we know the messages and byte layout are right without SGLang.
"""

import datetime
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from srpo_megatron.models.qwen3.exporter import export_hf_tensors, is_exporting_rank
from srpo_megatron.rollout.sglang_engine import SGLangEngine, WeightSyncError, as_result
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.weight_sync.buckets import (
    DEFAULT_BUCKET_BYTES,
    BucketMeta,
    allocate_bucket,
    bucket_meta,
    flatten_bucket,
    iter_buckets,
    misaligned,
    parse_dtype,
    unflatten_bucket,
)
from srpo_megatron.runtime.distributed import find_free_port, from_rank_0, host_group

FLATTENED_BUCKET = "flattened_bucket"
CLEANUP_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 300.0
"""Deadline of joining a weight-update group: a rendezvous and, with gloo, a connection per rank."""


class WeightReceiverHandle(Protocol):
    """A rollout engine replica as the sending rank sees it. Requests are asynchronous (the engine
    blocks in the collective until the trainer broadcasts) and resolve to SGLang's
    ``(success, message)``."""

    name: str
    world_size: int  # ranks this replica contributes to the weight-update group (its TP size)

    def request_join(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> Future: ...

    def request_receive(self, message: dict[str, Any]) -> Future: ...

    def request_leave(self, group_name: str) -> Future: ...


@dataclass(frozen=True)
class GroupAddress:
    """Where a weight-update group meets. The sender (group rank 0) hosts the TCP store."""

    master_address: str
    master_port: int
    group_name: str
    backend: str = "nccl"


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_buckets: int = 0
    num_bytes: int = 0
    seconds: float = 0.0


def update_message(
    meta: BucketMeta, group_name: str, *, flattened: bool = True, flush_cache: bool = False
) -> dict:
    """The keyword arguments of SGLang's ``Engine.update_weights_from_distributed`` for one bucket."""
    return {
        "names": list(meta.names),
        "dtypes": list(meta.dtypes),
        "shapes": [list(s) for s in meta.shapes],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "load_format": FLATTENED_BUCKET if flattened else None,
    }


class WeightsUpdateGroup:
    """One rank's membership of a weight-update group, made the way SGLang's engine ranks make theirs
    (``init_custom_process_group``, ``srt/utils/common.py`` in 0.5.23): a TCP rendezvous at
    ``master_address:master_port`` (the sender, rank 0, hosts the store), keys under
    ``group_name``, then the process group itself, with no ``device_id``. Its constructor returns
    once every rank has made its own with gloo (which connects there); with NCCL the communicator
    is built at the group's first collective (an eager NCCL group, ``device_id`` given, would block
    its creator until every rank has built its communicator, torch >= 2.7.1, and an engine builds
    its own only at the first ``update_weights_from_distributed`` broadcast)."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout: datetime.timedelta = datetime.timedelta(minutes=10),
    ):
        from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

        store, _, _ = next(
            dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
        )
        store.set_timeout(timeout)
        self.group, _ = _new_process_group_helper(
            world_size,
            rank,
            [],
            Backend(backend),
            dist.PrefixStore(group_name, store),
            group_name=group_name,
            timeout=timeout,
        )
        _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    def destroy(self) -> None:
        dist.destroy_process_group(self.group)


def _wait(futures: Sequence[tuple[str, Future]], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name, future in futures:
        try:
            ok, message = as_result(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            raise WeightSyncError(
                f"engine {name!r} did not answer {what} within {timeout_s:g} s (dead or stuck?)"
            ) from None
        except Exception as e:  # the transport itself failed (connection refused, engine process gone)
            raise WeightSyncError(f"engine {name!r} failed during {what}: {e!r}") from e
        if not ok:
            raise WeightSyncError(f"engine {name!r} refused {what}: {message}")


class BroadcastWeightSender:
    """The trainer side on one source rank (one PP stage): join once, then ``send`` every step.

    engines: every replica that must receive; they all join one group and get every bucket from
    one broadcast. address: this stage's group.
    """

    def __init__(
        self,
        engines: Sequence[WeightReceiverHandle],
        address: GroupAddress,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600.0,
        join_timeout_s: float = JOIN_TIMEOUT_S,
        device: torch.device | str | None = None,
    ):
        if not engines:
            raise ValueError("BroadcastWeightSender needs at least one engine")
        self.engines = list(engines)
        self.address = address
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.join_timeout_s = min(join_timeout_s, timeout_s)
        self.device = device
        self.member: WeightsUpdateGroup | None = None
        self.failed = False
        # two flat send buffers, reused: one bucket in flight while the next is flattened
        self._buffers: list[torch.Tensor | None] = [None, None]

    @property
    def world_size(self) -> int:
        return 1 + sum(e.world_size for e in self.engines)

    def connect(self) -> None:
        """Ask every engine to join, join as rank 0 while they do (see the module docstring), and
        wait for every answer. An engine that refuses, dies or does not answer within
        ``join_timeout_s`` is a ``WeightSyncError`` naming it and the group."""
        a = self.address
        futures, offset = [], 1
        for engine in self.engines:
            future = engine.request_join(
                master_address=a.master_address,
                master_port=a.master_port,
                rank_offset=offset,
                world_size=self.world_size,
                group_name=a.group_name,
                backend=a.backend,
            )
            futures.append((engine.name, future))
            offset += engine.world_size
        member: Future = Future()

        def join() -> None:  # blocks (gloo) until every engine rank has built its side
            try:
                member.set_result(
                    WeightsUpdateGroup(
                        a.master_address,
                        a.master_port,
                        0,
                        self.world_size,
                        a.group_name,
                        a.backend,
                        timeout=datetime.timedelta(seconds=self.timeout_s),
                    )
                )
            except BaseException as e:
                member.set_exception(e)

        # a daemon: a join that never completes must not keep the process alive
        threading.Thread(target=join, name=f"join-{a.group_name}", daemon=True).start()
        where = f"init_weights_update_group({a.group_name!r} at {a.master_address}:{a.master_port})"
        start = time.monotonic()
        _wait(futures, where, self.join_timeout_s)
        try:
            self.member = member.result(timeout=max(0.0, start + self.join_timeout_s - time.monotonic()))
        except FutureTimeout:
            names = ", ".join(repr(e.name) for e in self.engines)
            raise WeightSyncError(
                f"{where}: {names} answered, but the group was not complete within {self.join_timeout_s:g} s"
            ) from None
        except Exception as e:
            raise WeightSyncError(f"{where}: the trainer could not join: {e!r}") from e

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, flattened: bool = True) -> SyncStats:
        """Bucket the stream and broadcast it; returns once every engine has loaded every bucket.

        One bucket is in flight while the next is pulled from the exporter and flattened, so at
        most two flat buckets are alive. flattened=False sends one broadcast per tensor (SGLang's
        plain protocol), for comparison.
        """
        if self.member is None:
            raise RuntimeError("call connect() before send()")
        try:
            return self._send(named_tensors, flattened)
        except BaseException:
            self.failed = True  # broadcasts may be left in flight: see close()
            raise

    def _send(self, named_tensors, flattened: bool) -> SyncStats:
        stats = SyncStats()
        start = time.perf_counter()
        in_flight = None
        for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            if self.device is not None:
                bucket = [(n, t.to(self.device)) for n, t in bucket]
            if flattened:
                flat, meta = flatten_bucket(bucket, out=self._send_buffer(index % 2, bucket))
                payload = [flat]
            else:
                meta, payload = bucket_meta(bucket), [t.contiguous() for _, t in bucket]
            message = update_message(meta, self.address.group_name, flattened=flattened)
            futures = [(e.name, e.request_receive(message)) for e in self.engines]
            works = [dist.broadcast(t, group=self.member.group, group_src=0, async_op=True) for t in payload]
            if in_flight is not None:
                self._finish(*in_flight)
            in_flight = (index, meta, futures, works, payload)
            stats.num_tensors += len(meta.names)
            stats.num_buckets += 1
            stats.num_bytes += meta.nbytes
        if in_flight is not None:
            self._finish(*in_flight)
        stats.seconds = time.perf_counter() - start
        return stats

    def _send_buffer(self, slot: int, bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        buffer = self._buffers[slot]
        device = bucket[0][1].device
        if buffer is None or buffer.numel() < nbytes or buffer.device != device:
            buffer = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device=device)
            self._buffers[slot] = buffer
        return buffer

    def _finish(self, index, meta, futures, works, payload) -> None:
        # The engines' answers first: one that refuses never joins the broadcast, and waiting on
        # the collective would then hang until the group timeout instead of naming the engine.
        _wait(futures, f"bucket {index} ({len(meta.names)} tensors, {meta.nbytes} bytes)", self.timeout_s)
        for work in works:
            work.wait()
        del payload  # the sent buffers may go now

    def close(self) -> None:
        """Leave the group, and have every engine leave it (``destroy_weights_update_group``): an
        engine keeps its groups by name and cannot create one of the same name again, so a later
        run against the same servers could not join. After a failed send the group is only
        dropped: destroying it would wait for broadcasts that the engines never joined. An engine
        that does not leave is a printed warning, not an error: the run is over, and the next one
        joins under a group name of its own (``trainer/engines.py``)."""
        self._buffers = [None, None]
        member, self.member = self.member, None
        if member is None or self.failed:
            return
        name = self.address.group_name
        futures = [(e.name, e.request_leave(group_name=name)) for e in self.engines]
        member.destroy()
        try:
            _wait(futures, f"destroy_weights_update_group({name!r})", min(self.timeout_s, CLEANUP_TIMEOUT_S))
        except WeightSyncError as e:
            print(f"warning: {e}", flush=True)


class BroadcastWeightReceiver:
    """SGLang's receive side for one engine rank, in plain torch (see module docstring).

    load_weights: called with each received bucket's ``[(hf_name, tensor)]`` (e.g.
    ``HFEngine.update_weights``); it must copy the tensors, not keep them (they are views into a
    receive buffer that the next bucket reuses, as SGLang's ``model.load_weights`` copies into the
    parameters). Methods return ``(success, message)`` like SGLang's.
    """

    def __init__(
        self,
        load_weights: Callable[[list[tuple[str, torch.Tensor]]], None],
        *,
        tp_rank: int = 0,
        device: torch.device | str = "cpu",
        timeout_s: float = 600.0,
    ):
        self.load_weights = load_weights
        self.tp_rank = tp_rank
        self.device = device
        self.timeout_s = timeout_s
        self.groups: dict[str, WeightsUpdateGroup] = {}
        self._buffer: torch.Tensor | None = None  # reused: load_weights copies out of it

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> tuple[bool, str]:
        if group_name in self.groups:
            return False, f"group {group_name!r} exists already"
        try:
            self.groups[group_name] = WeightsUpdateGroup(
                master_address,
                master_port,
                rank_offset + self.tp_rank,
                world_size,
                group_name,
                backend,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        except Exception as e:
            return False, f"failed to join {group_name!r}: {e!r}"
        return True, f"joined {group_name!r}"

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> tuple[bool, str]:
        member = self.groups.get(group_name)
        if member is None:
            return False, f"group {group_name!r} not initialised; call init_weights_update_group first"
        try:
            meta = BucketMeta(tuple(names), tuple(dtypes), tuple(tuple(s) for s in shapes))
            if load_format == FLATTENED_BUCKET:
                if problem := misaligned(meta):  # as SGLang refuses it, before joining the broadcast
                    return False, problem
                flat = allocate_bucket(meta, self.device, reuse=self._buffer)
                if self._buffer is None or flat.numel() > self._buffer.numel():
                    self._buffer = flat
                dist.broadcast(flat, group=member.group, group_src=0)
                weights = unflatten_bucket(flat, meta)
            elif load_format is None:
                weights = [
                    (n, torch.empty(s, dtype=parse_dtype(d), device=self.device))
                    for n, d, s in zip(names, dtypes, shapes, strict=True)
                ]
                group = member.group
                works = [dist.broadcast(t, group=group, group_src=0, async_op=True) for _, t in weights]
                for work in works:
                    work.wait()
            else:
                return False, f"unknown load_format {load_format!r}"
            self.load_weights(weights)
        except Exception as e:
            return False, f"failed to update weights: {e!r}; the engine's weights are partially updated"
        return True, f"loaded {len(names)} tensors"

    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        member = self.groups.pop(group_name, None)
        if member is None:
            return False, f"no group {group_name!r}"
        member.destroy()
        return True, f"destroyed {group_name!r}"


class BroadcastWeightSync:
    """Disaggregated SGLang engines (module docstring). Every rank calls ``sync`` and ``close``.

    fleet: the run's engines on global rank 0 (None elsewhere), which opens and closes their
    weight-update sessions. sender, engines: on each stage's source rank, its stage's group and its
    own HTTP adapters of the engines (None and empty elsewhere). Made by ``connect``.
    """

    def __init__(
        self,
        fleet: SGLangFleet | None,
        sender: BroadcastWeightSender | None = None,
        engines: Sequence[SGLangEngine] = (),
    ):
        self.fleet = fleet
        self.sender = sender
        self.engines = list(engines)

    @classmethod
    def connect(
        cls,
        fleet: SGLangFleet | None,
        urls: Sequence[str],
        *,
        engine_tp: int,
        group_name: str,
        master_address: str,
        bucket_bytes: int,
        timeout_s: float,
    ) -> "BroadcastWeightSync":
        """Every rank, once per run: each stage's source rank reaches the engines at ``urls`` and has
        them join its stage's group, hosted at ``master_address`` (where the engines reach this
        rank) on a free port. A failure on any rank is raised on every rank."""
        _, sends, stage = megatron_sync_role()
        sender, engines, error = None, [], None
        if sends:
            try:
                engines = [SGLangEngine.connect(u, tp_size=engine_tp, timeout_s=timeout_s) for u in urls]
                backend = "nccl" if torch.cuda.is_available() else "gloo"  # gloo with CPU engines
                address = GroupAddress(master_address, find_free_port(), f"{group_name}_pp{stage}", backend)
                device = (
                    torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
                )
                sender = BroadcastWeightSender(
                    engines, address, bucket_bytes=bucket_bytes, timeout_s=timeout_s, device=device
                )
                sender.connect()
            except Exception as e:
                error = e
        sync = cls(fleet, sender, engines)
        try:
            _sum_over_ranks(0, error, "joining the engines' weight-update groups")
        except BaseException:
            sync.close()
            raise
        return sync

    def sync(self, model: torch.nn.Module, hf_config: dict) -> dict[str, float]:
        """Rank 0 opens every engine's weight-update session; each stage's source rank broadcasts
        its stage; once every rank is done (or has failed: then every rank raises), rank 0 closes
        the sessions and flushes the engines' caches. ``sync/bytes`` on rank 0: every stage's."""
        exports, _, _ = megatron_sync_role()
        from_rank_0(lambda: self.fleet.begin_weight_update(), "opening the engines' weight-update sessions")
        num_bytes, error = 0, None
        try:
            if exports:
                num_bytes = send_or_drain(export_hf_tensors(model, hf_config), self.sender).num_bytes
        except Exception as e:
            error = e
        try:
            num_bytes = _sum_over_ranks(num_bytes, error, "the weight broadcast")
        except BaseException:
            if self.fleet is not None:
                self.fleet.end_weight_update(flush=False, quiet=True)
            raise
        from_rank_0(lambda: self.fleet.end_weight_update(), "finishing the weight update")
        return {"sync/bytes": float(num_bytes)} if self.fleet is not None else {}

    def close(self) -> None:
        """Leave this rank's stage group, and have the engines leave it (no collective: each source
        rank leaves its own group; rank 0's fleet stops launched servers after its own)."""
        try:
            if self.sender is not None:
                self.sender.close()
        finally:
            for engine in self.engines:
                engine.shutdown()


def _sum_over_ranks(value: int, error: Exception | None, what: str) -> int:
    """The sum of ``value`` over every rank, once every rank has reached this point; an error on
    any rank is raised on every rank (its own there, a ``WeightSyncError`` naming it elsewhere), so
    that no rank is left waiting in a later collective. The ranks meet on the CPU (``host_group``)."""
    outcomes = [None] * dist.get_world_size()
    failure = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(outcomes, (failure, value), group=host_group())
    if error is not None:
        raise error
    for rank, (failure, _) in enumerate(outcomes):
        if failure is not None:
            raise WeightSyncError(f"{what} failed on rank {rank}: {failure}")
    return sum(v for _, v in outcomes)


def megatron_sync_role() -> tuple[bool, bool, int]:
    """``(exports, sends, pp_rank)`` of this Megatron rank in a disaggregated sync.

    exports: this rank iterates ``export_hf_tensors`` (``is_exporting_rank``: data-parallel rank 0's
    model-parallel group, and with expert parallelism the other EP ranks that hold the rest of the
    experts: the TP gathers and expert broadcasts inside the exporter need them all). sends: it also
    owns the stage's weight-update group (TP rank 0 of data-parallel rank 0: where the exporter
    yields tensors). Other data-parallel replicas hold the same weights and do nothing.
    """
    from megatron.core import parallel_state as ps

    exports = is_exporting_rank()
    first = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    sends = exports and first and ps.get_tensor_model_parallel_rank() == 0
    return exports, sends, ps.get_pipeline_model_parallel_rank()


def send_or_drain(
    named_tensors: Iterable[tuple[str, torch.Tensor]], sender: BroadcastWeightSender | None
) -> SyncStats:
    """One step's sync on an exporting rank: the source sends, the others run the exporter's
    collectives to the end (they yield nothing)."""
    if sender is not None:
        return sender.send(named_tensors)
    for _ in named_tensors:
        pass
    return SyncStats()
