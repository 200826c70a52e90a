"""Bucket planning, SGLang's flat byte layout, the update messages, checksums: no processes."""

import pytest
import torch

from srpo_megatron.rollout.sglang_engine import as_result
from srpo_megatron.rollout.weight_sync.broadcast import update_message
from srpo_megatron.rollout.weight_sync.buckets import (
    BucketMeta,
    allocate_bucket,
    dtype_name,
    flatten_bucket,
    iter_buckets,
    misaligned,
    unflatten_bucket,
)
from srpo_megatron.rollout.weight_sync.verify import compare_checksums, record_checksums, weight_checksums


def _named(*sizes, dtype=torch.float32):
    return [(f"w{i}", torch.randn(n).to(dtype)) for i, n in enumerate(sizes)]


def test_buckets_fill_greedily_in_order():
    tensors = _named(10, 10, 10, 10, 10)  # 40 bytes each
    buckets = list(iter_buckets(tensors, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    assert list(iter_buckets(tensors, bucket_bytes=80)) == list(iter_buckets(tensors, bucket_bytes=99))


def test_tensor_larger_than_the_bucket_travels_alone():
    tensors = _named(2, 100, 2, 2)  # 8, 400, 8, 8 bytes
    buckets = list(iter_buckets(tensors, bucket_bytes=64))
    assert [[n for n, _ in b] for b in buckets] == [["w0"], ["w1"], ["w2", "w3"]]


def test_empty_stream_gives_no_bucket_and_bad_input_is_rejected():
    assert list(iter_buckets([], bucket_bytes=8)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(_named(1), bucket_bytes=0))
    with pytest.raises(ValueError, match="appears twice"):
        list(iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], bucket_bytes=8))
    with pytest.raises(ValueError, match="empty bucket"):
        flatten_bucket([])


def test_mixed_dtypes_round_trip_bitwise_through_the_flat_layout():
    # odd-sized bf16 first: the fp32 after it starts at an unaligned byte offset
    named = [
        ("a", torch.randn(3).to(torch.bfloat16)),
        ("b", torch.randn(2, 5)),
        ("c", torch.tensor([1, -2, 3], dtype=torch.int64)),
        ("d", torch.randn(4, 3).t()),  # non-contiguous
    ]
    flat, meta = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() == meta.nbytes == 6 + 40 + 24 + 48
    assert meta.dtypes == ("bfloat16", "float32", "int64", "float32")
    # the receiver sees only the message: allocate, fill (the broadcast), rebuild
    received = allocate_bucket(meta)
    received.copy_(flat)
    out = unflatten_bucket(received, meta)
    assert [n for n, _ in out] == ["a", "b", "c", "d"]
    for (_, want), (_, got) in zip(named, out, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    # SGLang's layout: each tensor's bytes, concatenated in order
    assert torch.equal(flat[6:46], named[1][1].reshape(-1).view(torch.uint8))
    # into a reused, larger buffer: the same bytes at its front; the receiver reuses likewise
    buffer = torch.zeros(500, dtype=torch.uint8)
    into, _ = flatten_bucket(named, out=buffer)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, flat)
    assert allocate_bucket(meta, reuse=buffer).data_ptr() == buffer.data_ptr()
    assert allocate_bucket(meta, reuse=buffer[:10]).numel() == meta.nbytes  # too small: a new one
    with pytest.raises(ValueError, match="at least 118 bytes"):
        flatten_bucket(named, out=buffer[:100])


def test_buckets_keep_every_tensor_aligned_for_its_dtype():
    """SGLang refuses a flat bucket with a tensor at a byte offset its dtype does not divide."""
    stream = [("a", torch.zeros(3, dtype=torch.bfloat16)), ("b", torch.zeros(2)), ("c", torch.zeros(2))]
    buckets = list(iter_buckets(stream, bucket_bytes=1 << 20))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"]]  # b would start at byte 6
    assert all(misaligned(flatten_bucket(b)[1]) is None for b in buckets)
    _, meta = flatten_bucket(stream)  # built by hand, unaligned
    assert misaligned(meta) == "unaligned tensor b: byte offset 6, dtype float32"


def test_layout_errors_are_clear():
    meta = BucketMeta(("a",), ("float32",), ((2,),))
    with pytest.raises(ValueError, match="has 4 bytes, the message describes 8"):
        unflatten_bucket(torch.zeros(4, dtype=torch.uint8), meta)
    with pytest.raises(ValueError, match="lengths differ"):
        BucketMeta(("a", "b"), ("float32",), ((2,),))
    with pytest.raises(ValueError, match="unknown dtype name 'floaty'"):
        unflatten_bucket(torch.zeros(8, dtype=torch.uint8), BucketMeta(("a",), ("floaty",), ((2,),)))


def test_update_message_is_sglangs_update_weights_from_distributed_kwargs():
    _, meta = flatten_bucket(
        [("model.norm.weight", torch.ones(4, dtype=torch.bfloat16)), ("x", torch.ones(2, 3))]
    )
    msg = update_message(meta, "weights_pp1")
    assert msg == {
        "names": ["model.norm.weight", "x"],
        "dtypes": ["bfloat16", "float32"],
        "shapes": [[4], [2, 3]],
        "group_name": "weights_pp1",
        "flush_cache": False,
        "load_format": "flattened_bucket",
    }
    assert update_message(meta, "g", flattened=False)["load_format"] is None
    assert (
        dtype_name(torch.float16) == "float16"
        and getattr(torch, dtype_name(torch.bfloat16)) is torch.bfloat16
    )


def test_answers():
    assert as_result((False, "no")) == (False, "no")
    assert as_result({"success": True, "message": "ok"}) == (True, "ok")
    assert as_result(None) == (True, "")


def test_checksums_catch_a_single_bit_and_missing_names():
    named = _named(5, 7)
    sent: dict = {}
    assert [n for n, _ in record_checksums(named, sent)] == ["w0", "w1"]
    held = {n: t.clone() for n, t in named}
    assert compare_checksums(sent, weight_checksums(held.items())) == []
    held["w1"].view(torch.int32)[3] ^= 1  # one bit of one float
    del held["w0"]
    problems = compare_checksums(sent, weight_checksums(held.items()))
    assert len(problems) == 2 and "w0: missing" in problems[0] and "w1: bytes differ" in problems[1]
