"""HF-named tensors -> buckets of bounded size -> one flat byte buffer per bucket, and back.

The flat layout is SGLang's ``FlattenedTensorBucket`` (``sglang/srt/weight_sync/tensor_bucket.py``,
the multi-dtype version): each tensor is flattened, viewed as ``uint8`` and concatenated in bucket
order with no padding; the receiver rebuilds tensor ``i`` from bytes ``[start_i, end_i)`` with the
``(name, dtype, shape)`` of the update message. Sender and receiver derive the offsets from the
message alone, so only names / dtypes / shapes travel next to the bytes.

Bucketing is greedy and streaming (the exporter yields one tensor at a time): a bucket is closed when
the next tensor would push it past ``bucket_bytes``, or would start at a byte offset that is not a
multiple of its element size (SGLang 0.5.23 refuses such a bucket: ``FlattenedTensorBucket.empty``);
a tensor larger than the limit travels alone.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class BucketMeta:
    """What the receiver needs to allocate and rebuild one bucket (the update message's payload)."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]  # torch dtype names without the "torch." prefix, as SGLang expects
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ValueError(
                f"bucket metadata lengths differ: {len(self.names)} names, {len(self.dtypes)} dtypes, "
                f"{len(self.shapes)} shapes"
            )

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(shape, dtype) for shape, dtype in zip(self.shapes, self.dtypes, strict=True))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (SGLang resolves it back with ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight-update message")
    return dtype


def tensor_nbytes(shape: Sequence[int], dtype: str | torch.dtype) -> int:
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * dtype.itemsize


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of ``(name, tensor)`` into lists of at most ``bucket_bytes`` bytes each.

    Order is kept. A tensor larger than ``bucket_bytes`` gets a bucket of its own; every tensor
    starts at an offset aligned for its dtype. Empty input
    yields nothing. Duplicate names are an error (the receiver would load one twice).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    seen: set[str] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weight stream")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or size % tensor.element_size()):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_meta(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> BucketMeta:
    return BucketMeta(
        names=tuple(name for name, _ in named_tensors),
        dtypes=tuple(dtype_name(t.dtype) for _, t in named_tensors),
        shapes=tuple(tuple(t.shape) for _, t in named_tensors),
    )


def flatten_bucket(
    named_tensors: Sequence[tuple[str, torch.Tensor]], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, BucketMeta]:
    """Concatenate the tensors' bytes into one ``uint8`` buffer (on the tensors' device).

    out: a 1-D uint8 buffer to write into (its first ``meta.nbytes`` bytes are returned). Reusing
    one saves an allocation per bucket; on the CPU the page faults of a fresh buffer cost several
    times the copy itself.
    """
    if not named_tensors:
        raise ValueError("cannot flatten an empty bucket")
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in named_tensors]
    meta = bucket_meta(named_tensors)
    if out is None:
        return torch.cat(parts), meta
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < meta.nbytes:
        raise ValueError(f"out must be a 1-D uint8 buffer of at least {meta.nbytes} bytes")
    return torch.cat(parts, out=out[: meta.nbytes]), meta


def allocate_bucket(
    meta: BucketMeta, device: torch.device | str = "cpu", reuse: torch.Tensor | None = None
) -> torch.Tensor:
    """The receive buffer for one bucket: ``meta.nbytes`` uninitialised bytes (the front of
    ``reuse`` when that is large enough and on ``device``)."""
    if reuse is not None and reuse.numel() >= meta.nbytes and reuse.device == torch.device(device):
        return reuse[: meta.nbytes]
    return torch.empty(meta.nbytes, dtype=torch.uint8, device=device)


def unflatten_bucket(flat: torch.Tensor, meta: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """Rebuild ``(name, tensor)`` from a flat buffer. Tensors are views into ``flat`` where the byte
    offset is aligned for their dtype, copies otherwise (bf16 after an odd-sized fp32 is fine,
    fp32 after an odd-sized bf16 is not)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 buffer, got {flat.dtype} of shape {tuple(flat.shape)}")
    if flat.numel() != meta.nbytes:
        raise ValueError(f"buffer has {flat.numel()} bytes, the message describes {meta.nbytes}")
    out = []
    start = 0
    for name, dtype_str, shape in zip(meta.names, meta.dtypes, meta.shapes, strict=True):
        dtype = parse_dtype(dtype_str)
        end = start + tensor_nbytes(shape, dtype)
        chunk = flat[start:end]
        if start % dtype.itemsize:
            chunk = chunk.clone()
        out.append((name, chunk.view(dtype).reshape(shape)))
        start = end
    return out


def misaligned(meta: BucketMeta) -> str | None:
    """The first tensor of a flat bucket whose byte offset is not a multiple of its element size
    (what SGLang's receiver refuses), or None."""
    offset = 0
    for name, shape, dtype in zip(meta.names, meta.shapes, meta.dtypes, strict=True):
        if offset % parse_dtype(dtype).itemsize:
            return f"unaligned tensor {name}: byte offset {offset}, dtype {dtype}"
        offset += tensor_nbytes(shape, dtype)
    return None
