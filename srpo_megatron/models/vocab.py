"""Megatron's padded vocabulary, and keeping the padding out of every probability.

Megatron splits the embedding and output layer by rows over TP, so it pads the vocabulary to a
multiple of ``divisible_by * tp`` rows. The padded rows are zero, so their logits are exactly 0 —
not -inf: a softmax over the padded vocabulary gives them probability. Everything that normalises
over the vocabulary (log-probs, entropy, top-k, KL/JSD terms; the vocab-parallel ops in
``srpo_megatron/ops/``) must mask token ids ``>= vocab_size`` first, per TP shard, with
``mask_padded_vocab``. Then log-probs over the padded vocabulary equal HF's over the true one.
"""

import torch

# Megatron-LM's --make-vocab-size-divisible-by default.
DEFAULT_VOCAB_DIVISOR = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int = 0) -> torch.Tensor:
    """Logits with the padded entries (global token id >= ``vocab_size``) set to the dtype's minimum.

    logits: ``[..., V_shard]``, the TP shard whose first column is global token ``vocab_start``
    (``tp_rank * V_shard``); communication-free. The minimum finite value rather than -inf keeps
    ``p * logp`` at 0 (not NaN) in entropy terms. Returns a new tensor when anything is masked,
    ``logits`` itself otherwise.
    """
    num_real = vocab_size - vocab_start  # real columns in this shard (may be <= 0 or > V_shard)
    if num_real >= logits.shape[-1]:
        return logits
    pad = torch.arange(logits.shape[-1], device=logits.device) >= max(num_real, 0)  # [V_shard]
    return logits.masked_fill(pad, torch.finfo(logits.dtype).min)
