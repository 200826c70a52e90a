"""Megatron's padded vocabulary.

Megatron splits the embedding and output layer by rows over TP, so it pads the vocabulary to a
multiple of ``divisible_by * tp`` rows. The padded rows are zero, so their logits are exactly 0,
not -inf: a softmax over the padded vocabulary would give them probability. The vocab-parallel ops
(``srpo_megatron/ops/``) therefore take the true vocabulary size and use only the columns below it
(``shard_math.count_valid_columns``: the fused path multiplies only the shard's valid weight rows);
log-probs then equal HF's over the true vocabulary.
"""

# Megatron-LM's --make-vocab-size-divisible-by default.
DEFAULT_VOCAB_DIVISOR = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
