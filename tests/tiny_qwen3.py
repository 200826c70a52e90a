"""The tiny Qwen3 shape the tests build on: small enough for 2 CPU cores, yet with what the mapping
must get right in Qwen3: grouped query attention (4 query heads over 2 KV groups) and a head_dim
(24) that is not hidden_size / heads. Tests override what they vary (vocabulary, layers, ties)."""

TINY_QWEN3 = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=256,
)


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY_QWEN3, **overrides})
