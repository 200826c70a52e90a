"""The tiny Qwen3 shape the tests build on: small enough for 2 CPU cores, yet with what the mapping
must get right in Qwen3: grouped query attention (4 query heads over 2 KV groups) and a head_dim
(24) that is not hidden_size / heads. Tests override what they vary (vocabulary, layers, ties).
``mask_padded_vocab`` makes Megatron's padded-vocabulary logits comparable with HF's."""

import torch

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


# Qwen3-MoE: the same attention; 4 experts of 32 hidden units, top-2 renormalised (Qwen3-30B-A3B's
# norm_topk_prob); intermediate_size is the MLP of the layers listed in mlp_only_layers.
TINY_QWEN3_MOE = {
    **TINY_QWEN3,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
}


def tiny_qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**TINY_QWEN3_MOE, **overrides})


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
