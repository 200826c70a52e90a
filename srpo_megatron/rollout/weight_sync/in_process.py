"""In-process weight sync: the HF engine, held by global rank 0, loads the actor's weights.

Every rank runs the exporter (its TP all-gathers are collectives). It yields each pipeline stage's
tensors on that stage's source rank (TP 0, DP 0): stage 0's is rank 0 itself; every later stage's
source sends its buckets to rank 0 point to point (flat bytes + the bucket's names / dtypes /
shapes, ``send_to``), and rank 0 loads the whole stream, its own stage first, then each later
stage in order (``with_stages_from``), one ``update_weights`` call per bucket. The engine lives in
rank 0's process, so the later stages have no shorter way to it.

verify (``rollout.verify_sync``): rank 0 checksums every tensor it loads and compares them with
what the engine holds afterwards (``verify.py``).
"""

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from srpo_megatron.models.qwen3.exporter import export_hf_tensors
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.rollout.weight_sync.buckets import (
    allocate_bucket,
    flatten_bucket,
    iter_buckets,
    unflatten_bucket,
)
from srpo_megatron.rollout.weight_sync.verify import compare_checksums, record_checksums, weight_checksums
from srpo_megatron.runtime.distributed import get_device


class InProcessWeightSync:
    """engine: the HF engine on global rank 0, None on every other rank."""

    def __init__(self, engine: HFEngine | None, *, bucket_bytes: int, verify: bool = False):
        assert (engine is not None) == (dist.get_rank() == 0), "the HF engine lives on global rank 0"
        self.engine = engine
        self.bucket_bytes = bucket_bytes
        self.verify = verify

    def sync(self, model: torch.nn.Module, hf_config: dict) -> dict[str, float]:
        from megatron.core import parallel_state

        stream = export_hf_tensors(model, hf_config)  # collective over TP: every rank iterates
        stage_sources = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        if self.engine is not None:
            return {"sync/bytes": float(self._load(with_stages_from(stream, stage_sources[1:])))}
        is_source = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        if is_source and dist.get_rank() in stage_sources[1:]:
            send_to(stream, 0, self.bucket_bytes)
        else:
            for _ in stream:  # not a source: take part in the TP gathers only
                pass
        return {}

    def _load(self, stream: Iterable[tuple[str, torch.Tensor]]) -> int:
        sent: dict = {}
        if self.verify:
            stream = record_checksums(stream, sent)
        num_bytes = 0
        for bucket in iter_buckets(stream, self.bucket_bytes):
            self.engine.update_weights(bucket)
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if self.verify:
            wrong = compare_checksums(sent, weight_checksums(self.engine.named_weights()))
            if wrong:
                raise RuntimeError(
                    f"weight sync verify: the engine does not hold what it was sent: {wrong[:5]}"
                )
        return num_bytes

    def close(self) -> None:
        """Nothing to leave: the engine is in this process."""


def send_to(stream: Iterable[tuple[str, torch.Tensor]], dst: int, bucket_bytes: int) -> None:
    """A later stage's source rank: its tensors to global rank ``dst`` bucket by bucket, then
    ``None`` (the end)."""
    for bucket in iter_buckets(stream, bucket_bytes):
        flat, meta = flatten_bucket(bucket)
        dist.send_object_list([meta], dst=dst)
        dist.send(flat, dst=dst)
    dist.send_object_list([None], dst=dst)


def with_stages_from(
    stream: Iterable[tuple[str, torch.Tensor]], sources: list[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's own tensors, then those of each rank in ``sources`` (``send_to``), in order."""
    yield from stream
    for src in sources:
        while True:
            box = [None]
            dist.recv_object_list(box, src=src)
            if box[0] is None:
                break
            flat = allocate_bucket(box[0], get_device())
            dist.recv(flat, src=src)
            yield from unflatten_bucket(flat, box[0])
