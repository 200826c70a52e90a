"""In-process weight sync: hand buckets of HF-named tensors to engines in this process.

The colocated path (SGLang on the training GPUs: ``update_weights_from_tensor`` passes CUDA IPC
handles, no copy through the host) and the HF engine's path. One call per bucket, not per tensor;
the KV cache is flushed once at the end. Colocated SGLang around training, per step::

    engine.release_memory()                  # before the train step: weights + KV cache freed
    ... train ...
    engine.resume_memory(tags=["weights"])   # weights back (stale), KV cache still free
    sync_weights_in_process(export_hf_tensors(model, hf_config), [engine])
    engine.resume_memory(tags=["kv_cache"])  # then generate

Run it on the rank that holds the engine handle and receives the stage's tensors (the exporter's
source ranks; with PP > 1 each stage's source sends its own layers to the same engines).
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
