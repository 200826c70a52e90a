"""Peak memory and time of the fused vocab-parallel op against the peers' path and a naive one, TP=2 on gloo.

    .venv/bin/python benchmarks/ops_memory.py                      # T = 1024 and 8192, bf16
    .venv/bin/python benchmarks/ops_memory.py --tokens 4096 --dtype fp32

Workload: the student's training call of SRPO on Qwen3's vocabulary (151,936 ids, padded the
Megatron way to a multiple of 128 * tp = 152,064, so 76,032 rows per rank): log-prob of the targets
and the top-100 log-probs with gradient, the full-vocabulary entropy as a metric (no gradient);
forward + backward of L = sum(logp) + sum(c * topk_logp), gradients to the hidden states and the
output weight shard. Hidden states and weight are in ``--dtype``: bf16 by default, what the actor
and the peers train in (the output layer's logits are bf16; every path computes its softmax
statistics in fp32). Hidden size 512 by default, to keep the default run near 4 minutes on 2 shared
cores (``--hidden 1024`` is Qwen3-0.6B's). Memory does not depend on it beyond the weight and its
gradient; time does: the fused path does 4 matmuls (forward, recompute, two gradients) where the
others do 3, and saves elementwise work on [T, V/tp] buffers, so its time ratio grows with H
where the matmuls dominate.

- fused: ``vocab_parallel_token_stats(hidden, weight_shard, ...)``, chunked over tokens
  (default chunk size), logits never held for all tokens, recomputed in backward.
- megatron, the peers' path (slime, verl, NeMo-RL on Megatron): the output layer's logits shard
  [T, V/tp] = hidden @ weight_shard.T (hidden-state gradient all-reduced in backward, as Megatron's
  ColumnParallelLinear without gathered output), held for all tokens; log-prob of the targets =
  -``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` on it (it saves an fp32 softmax
  [T, V/tp] for backward, and reuses that buffer as the gradient); the top-k ids as NeMo-RL's
  distributed top-k finds them (each rank's top-k, all-gathered, the top-k of the candidates); their
  log-probs with gradient from the logits shard as NeMo-RL's chunked distributed gather does (lse
  from max and sum-exp all-reduced, the logits at the ids summed over the group; backward
  recomputes the softmax chunk by chunk from the saved logits); the entropy as verl and slime
  compute it (max and sum-exp all-reduced, then sum p * z all-reduced). The helpers here run in
  chunks of ``--chunk-size`` tokens, as NeMo-RL's do, so the figure is a lower bound of the peers':
  verl and slime compute the entropy on the whole shard and clone the logits for it. Megatron's
  cross entropy works in place on its input when the logits are fp32 (``.float()`` is then no
  copy): with ``--dtype fp32`` it gets a clone, as verl passes one. Megatron's cross entropy
  normalises over the padded vocabulary; the padding columns of the logits are set to -1e30 (no
  gradient, so nothing is added to the backward) so that every path computes the same numbers.
- naive: logits shard = hidden @ weight_shard.T; all-gather the shards to [T, V] (backward: keep
  this rank's columns; the hidden gradient is all-reduced); then, in fp32, log_softmax / gather /
  topk / entropy on the full vocabulary; padding set to -1e30 in place.

Memory: each (path, T) runs in 2 freshly spawned processes, and each rank reports its peak
resident set size (``getrusage().ru_maxrss``, the kernel's high-water mark, which no sampling can
miss) minus its RSS just before the measured step, after the inputs were built. It counts what
the OS had to provide: tensors, allocator slack, gloo buffers. Large tensors are mmapped by glibc
and returned when freed, so the figure follows tensor lifetimes closely. The figure is the larger
of the two ranks. Time: wall clock of forward + backward between two barriers, one run each
(one core per rank, 1 intra-op thread). Ratios are fused / other path at the same T in the same
run; the paths' mean log-prob and mean entropy must agree.

A path whose estimated peak (``peak_estimate``: its [T, V/tp] or [T, V] buffers, bytes per element
as measured at T = 1024 and 2048) times 2 ranks exceeds 90% of the available RAM is skipped, and
the line says so with that estimate: naive at T = 8192 needs ~14 GiB per rank (3 x [T, V] fp32)
in either dtype, more than this 24 GiB machine has for 2 ranks; megatron ~5.2 GiB in bf16, ~7.5
GiB in fp32. ``--paths`` runs a subset. The last line printed is one JSON object: the T = 8192
headline (fused against megatron, and against naive where it ran; null where a path did not run)
plus every measured T.
"""

import argparse
import json
import resource
import time

import psutil
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from srpo_megatron.ops import DEFAULT_CHUNK_SIZE, vocab_parallel_token_stats
from srpo_megatron.runtime.launch import run_distributed

TRUE_VOCAB = 151_936
TP = 2
PADDED_VOCAB = -(-TRUE_VOCAB // (128 * TP)) * 128 * TP  # 152,064
SHARD = PADDED_VOCAB // TP
HEADLINE_T = 8192
PATHS = ("fused", "megatron", "naive")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
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


def naive_step(hidden, weight, targets, coef_topk, topk, group, chunk_size):
    logits = _CopyToGroup.apply(hidden, group) @ weight.T  # [T, V/tp]
    full = _GatherVocab.apply(logits, group).float()  # [T, V]
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
    return logp.detach(), entropy


def _token_chunks(num_tokens: int, chunk_size: int):
    return (slice(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size))


def _lse_(z: torch.Tensor, group) -> torch.Tensor:
    """Full-vocabulary log-partition [C] of fp32 logits shards [C, V/tp]; overwrites ``z`` with z - max."""
    m = z.amax(dim=-1)  # [C]
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = z.sub_(m[:, None]).exp().sum(dim=-1)  # [C]
    dist.all_reduce(s, group=group)
    return m + s.log()


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, group, chunk_size: int) -> torch.Tensor:
    """Entropy [T] of logits shards [T, V/tp], verl's formula H = m + log S - sum_v p_v z_v, by chunk."""
    entropy = torch.empty(logits.shape[0])
    for rows in _token_chunks(logits.shape[0], chunk_size):
        z = logits[rows].float()  # [C, V/tp]
        m = z.amax(dim=-1)  # [C]
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (z - m[:, None]).exp_()  # [C, V/tp]
        s = e.sum(dim=-1)  # [C]
        dist.all_reduce(s, group=group)
        pz = e.mul_(z).sum(dim=-1) / s  # [C]  sum_v p_v z_v on this shard
        dist.all_reduce(pz, group=group)
        entropy[rows] = m + s.log() - pz
    return entropy


@torch.no_grad()
def vocab_parallel_topk_ids(logits: torch.Tensor, k: int, vocab_start: int, group, chunk_size: int):
    """Global ids [T, k] of the k largest logits: local top-k, all-gather of the candidates, top-k of them."""
    ids = torch.empty(logits.shape[0], k, dtype=torch.long)
    for rows in _token_chunks(logits.shape[0], chunk_size):
        values, local_ids = logits[rows].float().topk(k, dim=-1)  # [C, k] each
        all_values = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        all_ids = [torch.empty_like(local_ids) for _ in range(dist.get_world_size(group))]
        dist.all_gather(all_values, values, group=group)
        dist.all_gather(all_ids, local_ids + vocab_start, group=group)
        best = torch.cat(all_values, dim=-1).topk(k, dim=-1).indices  # [C, k] of the TP * k candidates
        ids[rows] = torch.cat(all_ids, dim=-1).gather(1, best)
    return ids


class _LogpAtIds(torch.autograd.Function):
    """Log-probs [T, k] at global ids from logits shards [T, V/tp], by chunk; saves the logits."""

    @staticmethod
    def forward(ctx, logits, ids, vocab_start, group, chunk_size):
        local = ids - vocab_start  # [T, k]
        on_shard = (local >= 0) & (local < logits.shape[1])
        local = local.clamp(0, logits.shape[1] - 1)
        logp = torch.empty(ids.shape)  # [T, k] fp32
        lse = torch.empty(ids.shape[0])  # [T]
        for rows in _token_chunks(logits.shape[0], chunk_size):
            z = logits[rows].to(torch.float32, copy=True)  # [C, V/tp], a copy: _lse_ overwrites it
            at_ids = z.gather(1, local[rows]).masked_fill_(~on_shard[rows], 0.0)  # [C, k]
            dist.all_reduce(at_ids, group=group)  # each id is on one shard
            lse[rows] = _lse_(z, group)
            logp[rows] = at_ids - lse[rows, None]
        ctx.save_for_backward(logits, local, on_shard, lse)
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        # dL/dz_v = sum_j g_j 1[v = id_j] - p_v sum_j g_j, built chunk by chunk.
        logits, local, on_shard, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # [T, V/tp]
        for rows in _token_chunks(logits.shape[0], ctx.chunk_size):
            g = grad_logp[rows]  # [C, k]
            p = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_()  # [C, V/tp]
            grad = p.mul_(-g.sum(dim=-1, keepdim=True)).scatter_add_(1, local[rows], g * on_shard[rows])
            grad_logits[rows] = grad
        return grad_logits, None, None, None, None


def megatron_step(hidden, weight, targets, coef_topk, topk, group, chunk_size):
    vocab_start = dist.get_rank(group) * SHARD
    logits = _CopyToGroup.apply(hidden, group) @ weight.T  # [T, V/tp], Megatron's output layer
    with torch.no_grad():
        logits[:, max(0, TRUE_VOCAB - vocab_start) :] = -1e30  # padding columns out of the softmax
        entropy = vocab_parallel_entropy(logits, group, chunk_size)  # [T], a metric
        topk_ids = vocab_parallel_topk_ids(logits, topk, vocab_start, group, chunk_size)  # [T, k]
    topk_logp = _LogpAtIds.apply(logits, topk_ids, vocab_start, group, chunk_size)  # [T, k]
    if logits.dtype == torch.float32:  # the cross entropy would write its softmax into the saved logits
        logits = logits.clone()
    logp = -vocab_parallel_cross_entropy(logits, targets, tp_group=group)  # [T]
    del logits  # only the autograd graph holds buffers now, as in the other paths
    loss = logp.sum() + (coef_topk * topk_logp).sum()
    loss.backward()
    return logp.detach(), entropy


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
    return stats.logp.detach(), stats.entropy.detach()


STEPS = {"fused": fused_step, "megatron": megatron_step, "naive": naive_step}


def measure(path: str, num_tokens: int, hidden_size: int, topk: int, chunk_size: int, dtype: str) -> dict:
    """One rank: build inputs, then time forward + backward and take the peak-RSS delta."""
    torch.set_num_threads(1)
    group, rank = dist.group.WORLD, dist.get_rank()
    shared = torch.Generator().manual_seed(0)  # the same hidden states / targets on every rank
    hidden = torch.randn(num_tokens, hidden_size, generator=shared).to(DTYPES[dtype]).requires_grad_()
    targets = torch.randint(0, TRUE_VOCAB, (num_tokens,), generator=shared)
    coef_topk = torch.randn(num_tokens, topk, generator=shared)
    own = torch.Generator().manual_seed(1 + rank)
    weight = torch.randn(SHARD, hidden_size, generator=own) / hidden_size**0.5
    weight = weight.to(DTYPES[dtype]).requires_grad_()

    rss_before = psutil.Process().memory_info().rss
    dist.barrier()
    start = time.perf_counter()
    logp, entropy = STEPS[path](hidden, weight, targets, coef_topk, topk, group, chunk_size)
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert torch.isfinite(entropy).all() and torch.isfinite(weight.grad).all()
    assert torch.isfinite(hidden.grad).all()
    return {
        "peak_bytes": peak - rss_before,
        "seconds": seconds,
        "mean_logp": logp.float().mean().item(),
        "mean_entropy": entropy.float().mean().item(),
    }


def peak_estimate(path: str, num_tokens: int, dtype: str, chunk_size: int) -> tuple[float, str]:
    """Bytes per rank of the path's big buffers at their peak, and what they are (as measured up to T = 2048)."""
    size = DTYPES[dtype].itemsize
    chunks = 2 * chunk_size * SHARD * 4  # the helpers' fp32 chunk buffers
    if path == "naive":  # the fp32 copy of the gathered logits, log_softmax, then its gradient
        return num_tokens * PADDED_VOCAB * 3 * 4, "3 x [T, V] fp32"
    if path == "megatron":  # the logits, the cross entropy's fp32 softmax, then a logits gradient
        buffers = num_tokens * SHARD * (2 * size + 4)
        return buffers + chunks, f"2 x [T, V/tp] {dtype} + [T, V/tp] fp32 + chunks"
    return 2 * chunks, "4 x [chunk, V/tp] fp32"


def run(path: str, num_tokens: int, args) -> dict:
    if path not in args.paths:
        return {"skipped": "not in --paths"}
    estimate, buffers = peak_estimate(path, num_tokens, args.dtype, args.chunk_size)
    available = psutil.virtual_memory().available
    if TP * estimate > 0.9 * available:
        return {
            "skipped": f"needs ~{estimate / GIB:.1f} GiB per rank ({buffers}) x {TP} ranks, "
            f"{available / GIB:.1f} GiB available"
        }
    per_rank = run_distributed(
        measure,
        world_size=TP,
        args=(path, num_tokens, args.hidden, args.topk, args.chunk_size, args.dtype),
        megatron=False,
        timeout=1200,
    )
    return {
        "peak_gib": max(r["peak_bytes"] for r in per_rank) / GIB,
        "seconds": max(r["seconds"] for r in per_rank),
        "mean_logp": per_rank[0]["mean_logp"],
        "mean_entropy": per_rank[0]["mean_entropy"],
    }


def compare(row: dict, other: str) -> None:
    """Add fused / other ratios to ``row`` when both ran; the two paths must compute the same numbers."""
    fused, ran = row["fused"], row[other]
    if "skipped" in fused or "skipped" in ran:
        return
    for key in ("mean_logp", "mean_entropy"):
        gap = abs(fused[key] - ran[key])
        assert gap < 1e-3, f"fused and {other} disagree: {key} differs by {gap}"
    row[f"fused_vs_{other}_memory_ratio"] = fused["peak_gib"] / ran["peak_gib"]
    row[f"fused_vs_{other}_time_ratio"] = fused["seconds"] / ran["seconds"]


def describe(row: dict) -> str:
    parts = []
    for path in PATHS:
        result = row[path]
        if "skipped" in result:
            parts.append(f"{path} skipped ({result['skipped']})")
        else:
            parts.append(f"{path} {result['peak_gib']:.2f} GiB {result['seconds']:.1f} s")
    for other in PATHS[1:]:
        if f"fused_vs_{other}_memory_ratio" in row:
            parts.append(
                f"fused/{other}: memory {row[f'fused_vs_{other}_memory_ratio']:.3f} "
                f"time {row[f'fused_vs_{other}_time_ratio']:.3f}"
            )
    return f"T={row['T']:6d}: " + " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, HEADLINE_T])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--paths", choices=PATHS, nargs="+", default=list(PATHS))
    args = parser.parse_args()
    print(
        f"V={TRUE_VOCAB} (padded {PADDED_VOCAB}, {SHARD} per rank), TP={TP} gloo, H={args.hidden}, "
        f"top-{args.topk}, chunk={args.chunk_size}, {args.dtype} hidden/weight/logits, "
        "fp32 statistics, forward+backward",
        flush=True,
    )
    results = []
    for num_tokens in args.tokens:
        row: dict = {"T": num_tokens}
        for path in PATHS:
            row[path] = run(path, num_tokens, args)
        for other in PATHS[1:]:
            compare(row, other)
        print(describe(row), flush=True)
        results.append(row)
    headline = next((r for r in results if r["T"] == HEADLINE_T), {})
    summary = {"T": HEADLINE_T, "dtype": args.dtype}
    for key in ("memory_ratio", "time_ratio"):
        for other in PATHS[1:]:
            summary[f"fused_vs_{other}_{key}"] = headline.get(f"fused_vs_{other}_{key}")
    for path in PATHS:
        figures = headline.get(path, {})
        summary[f"{path}_peak_gib"] = figures.get("peak_gib")
        summary[f"{path}_s"] = figures.get("seconds")
    summary |= {"vocab": TRUE_VOCAB, "padded_vocab": PADDED_VOCAB, "tp": TP, "hidden": args.hidden}
    summary |= {"topk": args.topk, "chunk_size": args.chunk_size, "per_T": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
