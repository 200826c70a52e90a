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


def megatron_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Log-probs of ``labels`` [B, S] under a Megatron GPTModel stage, through Megatron's schedule
    (logits gathered over TP, padded vocabulary masked); [B, S] on the last stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    tp_group = ps.get_tensor_model_parallel_group()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()

    def loss_func(logits):  # [B, S, Vp/tp]
        masked = mask_padded_vocab(logits, vocab_size, tp_rank * logits.shape[-1])
        shards = [torch.empty_like(masked) for _ in range(tp)]
        torch.distributed.all_gather(shards, masked.contiguous(), group=tp_group)
        full = torch.cat(shards, -1)  # [B, S, Vp]; padded columns hold the dtype's minimum
        logp = torch.log_softmax(full, -1).gather(-1, labels[..., None])[..., 0]
        # the same numbers as a softmax over the true vocabulary only
        sliced = torch.log_softmax(full[..., :vocab_size], -1).gather(-1, labels[..., None])[..., 0]
        assert torch.allclose(logp, sliced, atol=1e-6)
        return logp.sum() * 0, {"logp": logp}

    def forward_step(data_iterator, model):
        position_ids = torch.arange(seq).expand(batch, seq)
        return model(next(data_iterator), position_ids, attention_mask=None), loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    return out[0]["logp"] if ps.is_pipeline_last_stage() else None
