"""Per-token statistics of vocab-parallel logits in one chunked pass: what SRPO needs from the vocab.

For every token t, over the FULL vocabulary (shards of all tensor-parallel ranks, padding excluded):
    logp[t]          = log softmax(z_t)[targets[t]]                  (policy / old / teacher log-prob)
    entropy[t]       = -sum_v p_tv log p_tv                            (teacher entropy, DW-SDPO)
    topk_ids[t]      = the k ids with the largest logits               (the student's top-K support)
    topk_logp[t]     = log softmax(z_t)[topk_ids[t]]
    gathered_logp[t] = log softmax(z_t)[gather_ids[t]]                 (the teacher at the student's ids)
The math of one shard and the gradient formula are in ``shard_math``; this module adds the chunk
loop and the collectives on an explicit process group (``None`` or size 1: no communication).

Two entry points with the same outputs:
- ``vocab_parallel_token_stats(hidden, weight, ...)`` goes from the final hidden states [T, H] and
  this rank's output-layer weight shard [V/tp, H] to the outputs without ever holding [T, V/tp]
  logits: per token chunk it multiplies, reduces to statistics, and discards; the backward
  recomputes each chunk's logits (no ``torch.utils.checkpoint``: only the inputs and the per-token
  lse / entropy / ids are saved). Extra memory is O(chunk_size x V/tp) plus the weight gradient.
- ``vocab_parallel_token_stats_from_logits(logits, ...)`` takes the logits shard [T, V/tp] that a
  caller already holds; extra memory is again O(chunk_size x V/tp) (plus the gradient it returns).

Communication per chunk in the forward: one all-gather of [C, 3 + N + k] floats (softmax partials,
logits at the requested ids, top-k candidates) and, with top-k, one of [C, k] ids. The backward
of the logits is local; the fused path all-reduces the hidden-state gradient once, because the
hidden states are replicated across the group (Megatron without sequence parallelism). With
sequence parallelism, gather the hidden states with Megatron's
``gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)`` first (its
backward then only splits the already-summed gradient). The per-token outputs are identical on all
ranks of the group, so each rank computes the same loss, as with Megatron's vocab-parallel cross
entropy.

Top-k ties: between exactly equal logits the id is chosen by ``torch.topk`` (unspecified, may
differ with TP); the log-probs are the same whichever id wins. The ids are sorted by logit, largest
first.

Precision: statistics are fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64, for gradcheck); the
fused matmuls run in the input dtype (bf16 on GPU, like Megatron's output layer); the weight
gradient accumulates over chunks in fp32.

Temperature (not needed now: training uses temperature 1) would be one more argument applied where
a chunk's logits are made (the ``chunk_logits`` of each forward and the recompute in each
backward): z = z / tau there, and dL/dz multiplied by 1 / tau before it leaves the chunk (into
the logits gradient or the two matmuls); the statistics and their merge do not change.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from srpo_megatron.ops.shard_math import (
    count_valid_columns,
    local_topk,
    logits_at,
    logits_grad_,
    merge_softmax_stats,
    merge_topk,
    softmax_stats_,
)

DEFAULT_CHUNK_SIZE = 1024


class TokenStats(NamedTuple):
    """Per-token outputs; a field is None when it was not asked for. Floats are fp32 (fp64 for fp64 inputs)."""

    logp: torch.Tensor | None  # [T]     log-prob of targets (differentiable)
    entropy: torch.Tensor | None  # [T]     full-vocabulary entropy (differentiable)
    topk_ids: torch.Tensor | None  # [T, k]  global ids, largest logit first (int64, no grad)
    topk_logp: torch.Tensor | None  # [T, k]  log-probs at topk_ids (differentiable)
    gathered_logp: torch.Tensor | None  # [T, K]  log-probs at gather_ids (differentiable)


def vocab_parallel_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    vocab_start: int,
    true_vocab_size: int,
    targets: torch.Tensor | None = None,
    topk: int = 0,
    gather_ids: torch.Tensor | None = None,
    want_entropy: bool = False,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """Fused output layer + statistics: hidden [T, H], weight shard [V/tp, H] -> ``TokenStats``.

    ``vocab_start``: global id of this shard's first row; rows whose id is >= ``true_vocab_size``
    are padding and are ignored (their weight gradient is 0). ``targets`` [T] and ``gather_ids``
    [T, K] are global ids in [0, true_vocab_size). Gradients flow to ``hidden`` (the full gradient,
    summed over the group) and to ``weight`` (this shard's rows).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V/tp, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    ids = _check_and_pack_ids(hidden, targets, gather_ids, topk, true_vocab_size, chunk_size)
    n_valid = count_valid_columns(weight.shape[0], vocab_start, true_vocab_size)
    outputs = _FusedTokenStats.apply(
        hidden, weight, ids, topk, want_entropy, vocab_start, n_valid, group, chunk_size
    )
    return _unpack(outputs, targets, gather_ids, topk, want_entropy)


def vocab_parallel_token_stats_from_logits(
    logits: torch.Tensor,
    *,
    vocab_start: int,
    true_vocab_size: int,
    targets: torch.Tensor | None = None,
    topk: int = 0,
    gather_ids: torch.Tensor | None = None,
    want_entropy: bool = False,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """Same as ``vocab_parallel_token_stats`` from this rank's logits shard [T, V/tp].

    The gradient w.r.t. ``logits`` is this shard's part (0 on padding columns), as in Megatron.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [T, V/tp], got {tuple(logits.shape)}")
    ids = _check_and_pack_ids(logits, targets, gather_ids, topk, true_vocab_size, chunk_size)
    n_valid = count_valid_columns(logits.shape[1], vocab_start, true_vocab_size)
    outputs = _LogitsTokenStats.apply(
        logits, ids, topk, want_entropy, vocab_start, n_valid, group, chunk_size
    )
    return _unpack(outputs, targets, gather_ids, topk, want_entropy)


def _check_and_pack_ids(tokens_first, targets, gather_ids, topk, true_vocab_size, chunk_size) -> torch.Tensor:
    """Validate the arguments; targets and gather_ids as one [T, N] id tensor (targets first)."""
    num_tokens = tokens_first.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= topk <= true_vocab_size:
        raise ValueError(f"topk must be in [0, true_vocab_size={true_vocab_size}], got {topk}")
    columns = []
    if targets is not None:
        if targets.shape != (num_tokens,):
            raise ValueError(f"targets must be [T={num_tokens}], got {tuple(targets.shape)}")
        columns.append(targets.unsqueeze(-1))
    if gather_ids is not None:
        if gather_ids.dim() != 2 or gather_ids.shape[0] != num_tokens:
            raise ValueError(f"gather_ids must be [T={num_tokens}, K], got {tuple(gather_ids.shape)}")
        columns.append(gather_ids)
    if not columns:
        return torch.zeros(num_tokens, 0, dtype=torch.long, device=tokens_first.device)
    ids = torch.cat(columns, dim=-1).long()  # [T, N]
    if ids.numel() and bool(((ids < 0) | (ids >= true_vocab_size)).any()):
        raise ValueError(f"targets / gather_ids must be token ids in [0, {true_vocab_size})")
    return ids


def _unpack(outputs, targets, gather_ids, topk, want_entropy) -> TokenStats:
    id_logp, topk_logp, topk_ids, entropy = outputs
    has_target = targets is not None
    return TokenStats(
        logp=id_logp[:, 0] if has_target else None,
        entropy=entropy if want_entropy else None,
        topk_ids=topk_ids if topk else None,
        topk_logp=topk_logp if topk else None,
        gathered_logp=id_logp[:, int(has_target) :] if gather_ids is not None else None,
    )


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Stack every rank's ``x``: [R, *x.shape] (R = 1 without a group)."""
    if _group_size(group) == 1:
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _forward_chunks(chunk_logits, num_tokens, dtype, ids, topk, want_entropy, vocab_start, group, chunk_size):
    """The forward loop shared by both Functions.

    ``chunk_logits(start, end)`` returns a fresh ``dtype`` [C, n_valid] tensor (it is overwritten).
    Returns (id_logp [T, N], topk_logp [T, k], topk_ids [T, k], entropy [T], lse [T]).
    """
    device = ids.device
    num_ids = ids.shape[1]
    id_logp = torch.empty(num_tokens, num_ids, dtype=dtype, device=device)
    topk_logp = torch.empty(num_tokens, topk, dtype=dtype, device=device)
    topk_ids = torch.empty(num_tokens, topk, dtype=torch.long, device=device)
    entropy = torch.empty(num_tokens, dtype=dtype, device=device)
    lse = torch.empty(num_tokens, dtype=dtype, device=device)
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        z = chunk_logits(start, end)  # [C, n_valid]
        at_ids = logits_at(z, ids[start:end], vocab_start)  # [C, N]
        cand_values, cand_ids = local_topk(z, topk, vocab_start)  # [C, k] each
        stats = softmax_stats_(z, want_entropy)  # [C, 3]; z is gone. Without want_entropy the
        # entropy below is meaningless; it is never returned nor differentiated then.
        del z
        packed = _all_gather(torch.cat([stats, at_ids, cand_values], dim=-1), group)  # [R, C, 3+N+k]
        chunk_lse, chunk_entropy = merge_softmax_stats(packed[..., :3])
        lse[start:end] = chunk_lse
        entropy[start:end] = chunk_entropy
        # Each id is on exactly one shard, the others hold 0: the sum is exact.
        id_logp[start:end] = packed[..., 3 : 3 + num_ids].sum(dim=0) - chunk_lse.unsqueeze(-1)
        if topk:
            all_values = packed[..., 3 + num_ids :].permute(1, 0, 2).flatten(1)  # [C, R*k]
            all_ids = _all_gather(cand_ids, group).permute(1, 0, 2).flatten(1)  # [C, R*k]
            best, best_ids = merge_topk(all_values, all_ids, topk)
            topk_logp[start:end] = best - chunk_lse.unsqueeze(-1)
            topk_ids[start:end] = best_ids
    return id_logp, topk_logp, topk_ids, entropy, lse


def _chunk_grad(saved, vocab_start, z, start, end, grad_id_logp, grad_topk_logp, grad_entropy):
    """dL/dz for tokens [start, end) from the saved (ids, topk_ids, entropy, lse); overwrites ``z``."""
    ids, topk_ids, entropy, lse = saved
    rows = slice(start, end)
    all_ids = torch.cat([ids[rows], topk_ids[rows]], dim=-1)  # [C, N + k]
    all_grads = None  # [C, N + k]
    if grad_id_logp is not None or grad_topk_logp is not None:
        zeros = lambda like: torch.zeros(like.shape, dtype=z.dtype, device=like.device)
        all_grads = torch.cat(
            [
                grad_id_logp[rows] if grad_id_logp is not None else zeros(ids[rows]),
                grad_topk_logp[rows] if grad_topk_logp is not None else zeros(topk_ids[rows]),
            ],
            dim=-1,
        )
    chunk_grad_entropy = grad_entropy[rows] if grad_entropy is not None else None
    return logits_grad_(z, lse[rows], entropy[rows], all_ids, all_grads, chunk_grad_entropy, vocab_start)


class _LogitsTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, topk, want_entropy, vocab_start, n_valid, group, chunk_size):
        # logits: [T, V/tp]; a float copy of each chunk, so the caller's logits are never written.
        dtype = _stats_dtype(logits)
        chunk_logits = lambda start, end: logits[start:end, :n_valid].to(dtype, copy=True)
        id_logp, topk_logp, topk_ids, entropy, lse = _forward_chunks(
            chunk_logits, logits.shape[0], dtype, ids, topk, want_entropy, vocab_start, group, chunk_size
        )
        ctx.save_for_backward(logits, ids, topk_ids, entropy, lse)
        ctx.vocab_start, ctx.n_valid, ctx.chunk_size = vocab_start, n_valid, chunk_size
        ctx.mark_non_differentiable(topk_ids)
        ctx.set_materialize_grads(False)
        return id_logp, topk_logp, topk_ids, entropy

    @staticmethod
    def backward(ctx, grad_id_logp, grad_topk_logp, _grad_topk_ids, grad_entropy):
        logits, *saved = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)  # [T, V/tp]; padding columns stay 0
        n_valid = ctx.n_valid
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, logits.shape[0])
            z = logits[start:end, :n_valid].to(_stats_dtype(logits), copy=True)  # [C, n_valid]
            grad_logits[start:end, :n_valid] = _chunk_grad(
                saved, ctx.vocab_start, z, start, end, grad_id_logp, grad_topk_logp, grad_entropy
            )
        return grad_logits, None, None, None, None, None, None, None


class _FusedTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, topk, want_entropy, vocab_start, n_valid, group, chunk_size):
        # hidden: [T, H], weight: [V/tp, H]; the padding rows (>= n_valid) are never multiplied.
        valid_weight = weight[:n_valid]  # [n_valid, H]
        dtype = _stats_dtype(weight)
        chunk_logits = lambda start, end: (hidden[start:end] @ valid_weight.T).to(dtype)  # [C, n_valid]
        id_logp, topk_logp, topk_ids, entropy, lse = _forward_chunks(
            chunk_logits, hidden.shape[0], dtype, ids, topk, want_entropy, vocab_start, group, chunk_size
        )
        ctx.save_for_backward(hidden, weight, ids, topk_ids, entropy, lse)
        ctx.vocab_start, ctx.n_valid, ctx.chunk_size, ctx.group = vocab_start, n_valid, chunk_size, group
        ctx.mark_non_differentiable(topk_ids)
        ctx.set_materialize_grads(False)
        return id_logp, topk_logp, topk_ids, entropy

    @staticmethod
    def backward(ctx, grad_id_logp, grad_topk_logp, _grad_topk_ids, grad_entropy):
        hidden, weight, *saved = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        n_valid = ctx.n_valid
        valid_weight = weight[:n_valid]  # [n_valid, H]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None  # [T, H]
        # [V/tp, H], accumulated over chunks in fp32; padding rows stay 0.
        grad_weight = torch.zeros_like(weight, dtype=_stats_dtype(weight)) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk_hidden = hidden[start:end]  # [C, H]
            z = (chunk_hidden @ valid_weight.T).to(_stats_dtype(weight))  # [C, n_valid], recomputed
            grad_z = _chunk_grad(
                saved, ctx.vocab_start, z, start, end, grad_id_logp, grad_topk_logp, grad_entropy
            ).to(weight.dtype)  # [C, n_valid], built in z's buffer
            del z
            if want_hidden:
                torch.mm(grad_z, valid_weight, out=grad_hidden[start:end])
            if want_weight:
                if weight.dtype == grad_weight.dtype:
                    grad_weight[:n_valid].addmm_(grad_z.T, chunk_hidden)
                else:
                    grad_weight[:n_valid] += grad_z.T @ chunk_hidden
            del grad_z  # before the next chunk's logits: at most two [C, n_valid] buffers live
        if want_hidden and _group_size(ctx.group) > 1:
            # The hidden states feed every shard: their gradient is the sum over the group.
            dist.all_reduce(grad_hidden, group=ctx.group)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None
