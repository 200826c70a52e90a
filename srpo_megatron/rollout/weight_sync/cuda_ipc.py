"""Colocated weight sync: every training rank hands the engine rank on its own GPU CUDA IPC handles
of its own copy of each bucket (SGLang's ``update_weights_from_tensor``).

Colocated SGLang (PP = 1, engines covering the training GPUs rank for rank: engine ``i`` on the
GPUs of global ranks ``[i * tp, (i + 1) * tp)``): every rank exports the full tensors (each
data-parallel replica runs the TP all-gathers) and per bucket serialises CUDA IPC handles of its own
copy; rank 0 gathers the handles and hands engine ``i`` those of its GPUs
(``SGLangFleet.load_serialized``): no copy through the host, no CUDA context on another GPU. A rank
frees its copy once rank 0 says every engine has loaded it (an engine's failure is raised on every
rank); torch's IPC reference counting keeps the memory from reuse until the engine's copies are
done. Engine memory: every rank has emptied its allocator cache before the weights come back, and
the KV cache returns after the new weights. The loads run in one SGLang weight-update session::

    resume_weights() -> begin_weight_update() -> load_serialized() per bucket ->
    end_weight_update() (+ flush_cache) -> resume_rest()
"""

import torch
import torch.distributed as dist

from srpo_megatron.models.qwen3.exporter import export_hf_tensors
from srpo_megatron.rollout.sglang_engine import serialize_tensors
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.weight_sync.buckets import flatten_bucket, iter_buckets, unflatten_bucket
from srpo_megatron.runtime.distributed import from_rank_0, host_group


class CudaIpcWeightSync:
    """fleet: the colocated engines on global rank 0, None on every other rank."""

    def __init__(self, fleet: SGLangFleet | None, *, bucket_bytes: int):
        assert (fleet is not None) == (dist.get_rank() == 0), "the fleet lives on global rank 0"
        self.fleet = fleet
        self.bucket_bytes = bucket_bytes

    def sync(self, model: torch.nn.Module, hf_config: dict) -> dict[str, float]:
        fleet = self.fleet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        else:  # CPU engines: shared-memory files (fd passing needs a multiprocessing authkey we don't share)
            torch.multiprocessing.set_sharing_strategy("file_system")
        rank, world = dist.get_rank(), dist.get_world_size()
        dist.barrier(group=host_group())  # every rank is done training and has emptied its cache
        # rank 0's engine calls each end in a broadcast of how they went: a failure there stops every rank
        from_rank_0(
            lambda: (fleet.resume_weights(), fleet.begin_weight_update()), "resuming the engines' weights"
        )
        num_bytes, loaded = 0, False
        try:
            for bucket in iter_buckets(
                export_hf_tensors(model, hf_config, every_tp_rank=True), self.bucket_bytes
            ):
                # a fresh copy, one buffer per bucket: one IPC handle per bucket, and never a handle
                # on the parameters themselves (replicated ones are exported as they are; torch's IPC
                # bookkeeping on a storage lives as long as the storage)
                flat, meta = flatten_bucket(bucket)
                payloads = [None] * world if rank == 0 else None
                dist.gather_object(
                    serialize_tensors(unflatten_bucket(flat, meta)), payloads, dst=0, group=host_group()
                )
                from_rank_0(lambda: fleet.load_serialized(payloads), "colocated weight load")  # noqa: B023
                num_bytes += meta.nbytes
                del bucket, flat
            loaded = True
        finally:
            if rank == 0 and not loaded:
                fleet.end_weight_update(flush=False, quiet=True)
        from_rank_0(lambda: (fleet.end_weight_update(), fleet.resume_rest()), "finishing the weight update")
        return {"sync/bytes": float(num_bytes)} if rank == 0 else {}

    def close(self) -> None:
        """Nothing to leave: no group, nothing kept between syncs."""
