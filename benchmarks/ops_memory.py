"""Peak memory and time of the fused vocab-parallel path against the naive one, TP=2 on gloo.

Workload: the student's training call of SRPO on Qwen3's vocabulary (151,936 ids, padded the
Megatron way to a multiple of 128 * tp = 152,064, so 76,032 rows per rank), fp32: log-prob of the
targets and the top-100 log-probs with gradient, the full-vocabulary entropy as a metric (no
gradient); forward + backward of L = sum(logp) + sum(c * topk_logp), gradients to the hidden
states and the output weight shard. Hidden size 512 by default, to keep the whole run under ~10
minutes on 2 shared cores (``--hidden 1024`` is Qwen3-0.6B's). Memory does not depend on it beyond
the weight and its gradient; time does: the fused path does 4 matmuls (forward, recompute, two
gradients) where the naive one does 3, and saves elementwise work and communication on the full
vocabulary, so its time ratio grows with H where the matmuls dominate.

- fused: ``vocab_parallel_token_stats(hidden, weight_shard, ...)``, chunked over tokens
  (default chunk size), logits never held for all tokens, recomputed in backward.
- naive: logits shard = hidden @ weight_shard.T; all-gather the shards to [T, V] (backward: keep
  this rank's columns; the hidden gradient is all-reduced, as Megatron's output layer does); then
  log_softmax / gather / topk / entropy on the full vocabulary; padding set to -1e30 in place.

Memory: each (path, T) runs in 2 freshly spawned processes, and each rank reports its peak
resident set size (``getrusage().ru_maxrss``, the kernel's high-water mark, which no sampling can
miss) minus its RSS just before the measured step, after the inputs were built. It counts what
the OS had to provide: tensors, allocator slack, gloo buffers. Large tensors are mmapped by glibc
and returned when freed, so the figure follows tensor lifetimes closely. The figure is the larger
of the two ranks. Time: wall clock of forward + backward between two barriers, one run each
(one core per rank, 1 intra-op thread). Ratios are fused / naive at the same T in the same run.

The naive path needs about 3 full-vocabulary fp32 [T, V] buffers per rank at its peak; when that
times 2 ranks exceeds 90% of the available RAM it is skipped, and the line says so with that
estimate (at T = 16384 it is ~28 GiB per rank, more than this 24 GiB machine has).
The last line printed is one JSON object: the T = 4096 headline plus every measured T.
"""

import argparse
import json
import resource
import time

import psutil
import torch
import torch.distributed as dist

from srpo_megatron.ops import DEFAULT_CHUNK_SIZE, vocab_parallel_token_stats
from srpo_megatron.runtime.launch import run_distributed

TRUE_VOCAB = 151_936
TP = 2
PADDED_VOCAB = -(-TRUE_VOCAB // (128 * TP)) * 128 * TP  # 152,064
SHARD = PADDED_VOCAB // TP
GIB = 2**30


class _GatherVocab(torch.autograd.Function):
    """[T, V/tp] shards -> [T, V]; backward keeps this rank's columns (every rank has the same loss)."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.rank, ctx.size = dist.get_rank(group), shard.shape[1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None


class _CopyToGroup(torch.autograd.Function):
    """Identity; backward all-reduces (the hidden states feed every vocabulary shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def naive_step(hidden, weight, targets, coef_topk, topk, group):
    logits = _CopyToGroup.apply(hidden, group) @ weight.T  # [T, V/tp]
    full = _GatherVocab.apply(logits, group)  # [T, V]
    del logits
    full[:, TRUE_VOCAB:] = -1e30  # padding: exp() = 0, finite, so p * log p = 0
    logp_all = full.log_softmax(dim=-1)  # [T, V]
    del full
    logp = logp_all.gather(1, targets[:, None])[:, 0]  # [T]
    topk_logp = logp_all.topk(topk, dim=-1).values  # [T, k]
    with torch.no_grad():
        entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # [T], a metric
    loss = logp.sum() + (coef_topk * topk_logp).sum()
    loss.backward()
    return entropy


def fused_step(hidden, weight, targets, coef_topk, topk, group, chunk_size):
    stats = vocab_parallel_token_stats(
        hidden,
        weight,
        vocab_start=dist.get_rank(group) * SHARD,
        true_vocab_size=TRUE_VOCAB,
        targets=targets,
        topk=topk,
        want_entropy=True,
        group=group,
        chunk_size=chunk_size,
    )
    loss = stats.logp.sum() + (coef_topk * stats.topk_logp).sum()
    loss.backward()
    return stats.entropy.detach()


def measure(path: str, num_tokens: int, hidden_size: int, topk: int, chunk_size: int) -> dict:
    """One rank: build inputs, then time forward + backward and take the peak-RSS delta."""
    torch.set_num_threads(1)
    group, rank = dist.group.WORLD, dist.get_rank()
    shared = torch.Generator().manual_seed(0)  # the same hidden states / targets on every rank
    hidden = torch.randn(num_tokens, hidden_size, generator=shared).requires_grad_()
    targets = torch.randint(0, TRUE_VOCAB, (num_tokens,), generator=shared)
    coef_topk = torch.randn(num_tokens, topk, generator=shared)
    own = torch.Generator().manual_seed(1 + rank)
    weight = (torch.randn(SHARD, hidden_size, generator=own) / hidden_size**0.5).requires_grad_()

    rss_before = psutil.Process().memory_info().rss
    dist.barrier()
    start = time.perf_counter()
    if path == "naive":
        entropy = naive_step(hidden, weight, targets, coef_topk, topk, group)
    else:
        entropy = fused_step(hidden, weight, targets, coef_topk, topk, group, chunk_size)
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert torch.isfinite(entropy).all() and torch.isfinite(weight.grad).all()
    return {"peak_bytes": peak - rss_before, "seconds": seconds, "mean_entropy": entropy.mean().item()}


def run(path: str, num_tokens: int, args) -> dict:
    per_rank = run_distributed(
        measure,
        world_size=TP,
        args=(path, num_tokens, args.hidden, args.topk, args.chunk_size),
        megatron=False,
        timeout=1200,
    )
    return {
        "peak_gib": max(r["peak_bytes"] for r in per_rank) / GIB,
        "seconds": max(r["seconds"] for r in per_rank),
        "mean_entropy": per_rank[0]["mean_entropy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    args = parser.parse_args()
    print(
        f"V={TRUE_VOCAB} (padded {PADDED_VOCAB}, {SHARD} per rank), TP={TP} gloo, H={args.hidden}, "
        f"top-{args.topk}, chunk={args.chunk_size}, fp32, forward+backward",
        flush=True,
    )
    results = []
    for num_tokens in args.tokens:
        row: dict = {"T": num_tokens}
        naive_estimate = 3 * num_tokens * PADDED_VOCAB * 4  # bytes per rank
        if TP * naive_estimate > 0.9 * psutil.virtual_memory().available:
            row["naive"] = None
            row["naive_skipped"] = (
                f"needs ~{naive_estimate / GIB:.1f} GiB per rank (3 x [T, V] fp32) x {TP} ranks, "
                f"{psutil.virtual_memory().available / GIB:.1f} GiB available"
            )
        else:
            row["naive"] = run("naive", num_tokens, args)
        row["fused"] = run("fused", num_tokens, args)
        if row["naive"] is not None:
            row["memory_ratio"] = row["fused"]["peak_gib"] / row["naive"]["peak_gib"]
            row["time_ratio"] = row["fused"]["seconds"] / row["naive"]["seconds"]
            entropy_gap = abs(row["fused"]["mean_entropy"] - row["naive"]["mean_entropy"])
            assert entropy_gap < 1e-3, f"paths disagree: mean entropy differs by {entropy_gap}"
        naive_text = (
            f"naive {row['naive']['peak_gib']:.2f} GiB {row['naive']['seconds']:.1f} s"
            if row["naive"] is not None
            else f"naive skipped ({row['naive_skipped']})"
        )
        ratios = (
            f" | memory_ratio {row['memory_ratio']:.3f} time_ratio {row['time_ratio']:.3f}"
            if "memory_ratio" in row
            else ""
        )
        print(
            f"T={num_tokens:6d}: fused {row['fused']['peak_gib']:.2f} GiB {row['fused']['seconds']:.1f} s | "
            f"{naive_text}{ratios}",
            flush=True,
        )
        results.append(row)
    headline = next((r for r in results if r["T"] == 4096 and "memory_ratio" in r), None)
    summary = {
        "T": 4096,
        "memory_ratio": headline["memory_ratio"] if headline else None,
        "time_ratio": headline["time_ratio"] if headline else None,
        "vocab": TRUE_VOCAB,
        "tp": TP,
        "hidden": args.hidden,
        "chunk_size": args.chunk_size,
        "per_T": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
