"""Per-shard vocabulary math for one token chunk, with no communication.

A tensor-parallel rank holds the logits z[t, v] of its vocabulary shard
[vocab_start, vocab_start + V/tp) of Megatron's padded vocabulary. Only the first ``n_valid =
clamp(true_vocab_size - vocab_start, 0, V/tp)`` columns are real tokens; the callers cut the shard
to those columns before calling anything here, which is the same as setting the padding to -inf:
it never enters a statistic and gets a zero gradient. A shard may be empty (n_valid = 0) when the
padding is wider than a shard; every helper handles that.

Full-vocabulary softmax statistics of a token from per-shard partial sums (r = rank):
    m_r = max_{v in r} z_v,  s_r = sum_{v in r} exp(z_v - m_r),  a_r = sum_{v in r} exp(z_v - m_r) (z_v - m_r)
    m = max_r m_r,  w_r = exp(m_r - m),  S = sum_r w_r s_r
    lse = m + log S                                          (log-partition over the full vocabulary)
    H = -sum_v p_v log p_v = log S - sum_r w_r (a_r + (m_r - m) s_r) / S
with p_v = exp(z_v - lse). Everything is taken relative to a max, so fp32 keeps its precision
(no cancellation between lse and E_p[z] when the logits are large).

Log-prob at an id: z_id - lse; z_id lives on exactly one shard, the others contribute 0.

Top-k: each shard proposes its own top-k (padded with -inf when it has fewer than k real
columns); the k best of the tp*k candidates are the global top-k.

Gradient w.r.t. a shard's logits, given upstream gradients g_j of the log-probs at ids i_j
(targets, gathered ids and top-k ids alike: the top-k selection is piecewise constant) and g_H of
the entropy:
    d log p_i / d z_v = 1[v = i] - p_v
    d H / d z_v       = -p_v (log p_v + H)
    dL/dz_v = sum_j g_j 1[v = i_j] - p_v (sum_j g_j + g_H (log p_v + H))
It is local once lse and H are known: the logits' backward needs no communication.

Helpers whose name ends in ``_`` overwrite their ``z`` argument to save a [C, V/tp] buffer.
"""

import torch


def count_valid_columns(shard_size: int, vocab_start: int, true_vocab_size: int) -> int:
    """Number of real (non-padding) vocabulary columns in the shard starting at ``vocab_start``."""
    return max(0, min(shard_size, true_vocab_size - vocab_start))


def softmax_stats_(z: torch.Tensor, want_entropy: bool) -> torch.Tensor:
    """Per-token partial sums (m_r, s_r, a_r) of this shard: [C, 3]. Overwrites ``z`` [C, n_valid].

    Empty shard: (-inf, 0, 0). ``a_r`` is 0 when ``want_entropy`` is False.
    """
    num_tokens = z.shape[0]
    if z.shape[1] == 0:
        stats = torch.zeros(num_tokens, 3, dtype=z.dtype, device=z.device)
        stats[:, 0] = float("-inf")
        return stats
    m = z.amax(dim=-1)  # [C]
    shifted = z.sub_(m.unsqueeze(-1))  # [C, n_valid]  z - m_r
    p = shifted.exp()  # [C, n_valid]  exp(z - m_r)
    s = p.sum(dim=-1)  # [C]
    a = p.mul_(shifted).sum(dim=-1) if want_entropy else torch.zeros_like(s)  # [C]
    return torch.stack([m, s, a], dim=-1)


def merge_softmax_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-shard (m_r, s_r, a_r) [R, C, 3] into the full-vocab (lse [C], entropy [C])."""
    m_r, s_r, a_r = stats.unbind(dim=-1)  # [R, C] each
    m = m_r.amax(dim=0)  # [C]
    # An empty shard has m_r = -inf and s_r = a_r = 0: give it shift 0 so that 0 * inf never happens.
    shift = torch.where(s_r > 0, m_r - m, torch.zeros_like(m_r))  # [R, C]  m_r - m <= 0
    w = shift.exp()  # [R, C]
    total = (w * s_r).sum(dim=0)  # [C]  S
    log_total = total.log()
    lse = m + log_total
    entropy = log_total - (w * (a_r + shift * s_r)).sum(dim=0) / total
    return lse, entropy


def logits_at(z: torch.Tensor, ids: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Logits of this shard at global ``ids`` [C, N]; 0 where an id is on another shard: [C, N]."""
    local = ids - vocab_start  # [C, N]
    on_shard = (local >= 0) & (local < z.shape[1])
    if z.shape[1] == 0 or ids.shape[1] == 0:
        return torch.zeros(ids.shape, dtype=z.dtype, device=z.device)
    values = z.gather(1, local.clamp(0, z.shape[1] - 1))  # [C, N]
    return values.masked_fill_(~on_shard, 0.0)


def local_topk(z: torch.Tensor, k: int, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's k largest logits [C, k] and their global ids [C, k].

    A shard with fewer than k real columns pads with (-inf, id -1); those never win the merge
    because k <= true_vocab_size guarantees k real candidates in total.
    """
    num_tokens, n_valid = z.shape
    kept = min(k, n_valid)
    values, local_ids = z.topk(kept, dim=-1) if kept else (z[:, :0], z[:, :0].long())
    if kept == k:
        return values, local_ids + vocab_start
    pad = k - kept
    values = torch.cat([values, z.new_full((num_tokens, pad), float("-inf"))], dim=-1)
    ids = torch.cat([local_ids + vocab_start, local_ids.new_full((num_tokens, pad), -1)], dim=-1)
    return values, ids


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the candidates ``values``/``ids`` [C, R*k] (ranks concatenated): [C, k] each.

    Ties between exactly equal logits are broken by ``torch.topk`` (unspecified order): the
    values, hence the log-probs, are the same whichever id wins.
    """
    best, where = values.topk(k, dim=-1)  # [C, k]
    return best, ids.gather(1, where)


def logits_grad_(
    z: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    ids: torch.Tensor,
    grad_ids: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    vocab_start: int,
) -> torch.Tensor:
    """dL/dz for this shard's chunk [C, n_valid] (see the module docstring). Overwrites ``z``.

    z: [C, n_valid] fp32 logits; lse, entropy, grad_entropy: [C]; ids, grad_ids: [C, N] global ids
    with the upstream gradients of their log-probs (duplicates accumulate). ``None`` = zero.
    """
    logp = z.sub_(lse.unsqueeze(-1))  # [C, n_valid]  log p_v
    p = logp.exp()  # [C, n_valid]
    grad_sum = grad_ids.sum(dim=-1, keepdim=True) if grad_ids is not None else None  # [C, 1]
    if grad_entropy is not None:
        # -p * (sum_j g_j + g_H * (log p + H)), built in the log p buffer.
        coef = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
        if grad_sum is not None:
            coef.add_(grad_sum)
        grad = coef.mul_(p).neg_()
    elif grad_sum is not None:
        grad = p.mul_(grad_sum.neg())
    else:
        return p.zero_()
    if grad_ids is not None and ids.shape[1] and z.shape[1]:
        local = ids - vocab_start  # [C, N]
        on_shard = (local >= 0) & (local < z.shape[1])
        grad.scatter_add_(1, local.clamp(0, z.shape[1] - 1), grad_ids.masked_fill(~on_shard, 0.0))
    return grad
