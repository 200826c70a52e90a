"""In-process weight sync: hand buckets of HF-named tensors to engines held by this process.

The HF engine's path (the trainer's ``sync_weights`` on rank 0, ``trainer/engines.py``). One call
per bucket, not per tensor; the KV cache is flushed once at the end where the engine has one.
Colocated SGLang does not come through here: every rank hands its own GPU's copy to its engine
rank (``trainer/engines.py: _sync_colocated``).
"""

import time
from collections.abc import Iterable, Sequence

import torch

from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.rollout.weight_sync.broadcast import SyncStats
from srpo_megatron.rollout.weight_sync.buckets import DEFAULT_BUCKET_BYTES, iter_buckets


def sync_weights_in_process(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    engines: Sequence[RolloutEngine],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    flush_cache: bool = True,
) -> SyncStats:
    stats = SyncStats()
    start = time.perf_counter()
    for bucket in iter_buckets(named_tensors, bucket_bytes):
        for engine in engines:
            engine.update_weights(bucket)
        stats.num_buckets += 1
        stats.num_tensors += len(bucket)
        stats.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    if flush_cache:
        for engine in engines:
            if hasattr(engine, "flush_cache"):
                engine.flush_cache()
    stats.seconds = time.perf_counter() - start
    return stats
