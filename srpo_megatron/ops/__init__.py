"""Vocab-parallel kernels: per-token log-probs, entropy, top-k and log-probs at given ids of
logits sharded over the vocabulary, chunked over tokens, on an explicit process group.

Layers: ``shard_math`` (one shard, one chunk, no communication), ``token_stats`` (the autograd
Functions: chunk loop, collectives, recompute in backward). The top-k tail bucket is the loss's
(``algorithms/distillation.compute_tail_logp``).
"""

from srpo_megatron.ops.token_stats import (
    DEFAULT_CHUNK_SIZE,
    TokenStats,
    vocab_parallel_token_stats,
    vocab_parallel_token_stats_from_logits,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TokenStats",
    "vocab_parallel_token_stats",
    "vocab_parallel_token_stats_from_logits",
]
