"""A tiny random Qwen3 in HF form: the starting point of the CPU run (``format_warmup.py`` then
teaches it the answer format) and the model of the tests; and its mixture-of-experts sibling,
a tiny Qwen3-MoE (the same attention, 8 experts of which each token takes 2)."""

from dataclasses import dataclass

import torch


@dataclass
class TinyQwen3Config:
    """Shape of the tiny model (Qwen3 layout; vocab padded like Qwen3's 151,936 >= 151,669 tokens)."""

    vocab_size: int = 151_936
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0


@dataclass
class TinyQwen3MoeConfig(TinyQwen3Config):
    """Shape of the tiny Qwen3-MoE: every layer sparse (as Qwen3-30B-A3B), 8 experts of 64 hidden
    units, top-2 renormalised (``norm_topk_prob``, as Qwen3-30B-A3B), an output layer of its own
    (untied, as Qwen3-30B-A3B; SGLang 0.5.23 cannot serve a tied Qwen3-MoE). 8 experts split evenly
    over EP = 1, 2, 4 or 8."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1


def build_tiny_qwen3(tokenizer, seed: int, config: TinyQwen3Config | None = None):
    """A randomly initialised fp32 HF Qwen3ForCausalLM with tied embeddings (same seed -> same
    weights); a Qwen3MoeForCausalLM, untied, when ``config`` is a ``TinyQwen3MoeConfig``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = config or TinyQwen3Config()
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} < {len(tokenizer)} tokenizer tokens")
    is_moe = isinstance(config, TinyQwen3MoeConfig)
    config_class, model_class = (
        (Qwen3MoeConfig, Qwen3MoeForCausalLM) if is_moe else (Qwen3Config, Qwen3ForCausalLM)
    )
    hf_config = config_class(
        **vars(config),
        tie_word_embeddings=not is_moe,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    return model_class(hf_config).float()
