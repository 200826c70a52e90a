"""A Megatron-core smoke run on this machine: a tiny Qwen3-shaped GPTModel trained for a few AdamW
steps at TP=2 (gloo on CPU, NCCL on GPUs), printing the loss of each step.

    python -m srpo_megatron.runtime.smoke [--steps N]

A quick check that Megatron-core trains on this machine, and the model builder of the runtime tests.
It exercises the real pieces: Megatron's parallel layers (local spec), DDP,
``get_megatron_optimizer`` and our CPU runtime.
"""

import argparse
import time

import torch

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed


def build_tiny_gpt(vocab_size=96, seq_length=16, num_layers=4, pre_process=True, post_process=True):
    """A tiny Qwen3-shaped GPTModel on Megatron's local spec: RMSNorm, SwiGLU, GQA, qk-norm, RoPE.

    Built for the current Megatron parallel state. ``use_cpu_initialization`` draws the full master
    weights and then splits them, so the weights are the same at any TP size for the same seed.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=24,  # head_dim independent of hidden/heads, as in Qwen3
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config,
        spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=False,
    )


def random_batch(batch_size=4, seq_length=16, vocab_size=96, seed=0):
    """(tokens, labels, position_ids), each [B, S], from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_length + 1), generator=g)
    position_ids = torch.arange(seq_length).expand(batch_size, seq_length)
    return tokens[:, :-1], tokens[:, 1:], position_ids


def train_steps(num_steps: int, lr: float = 3e-3) -> list[float]:
    """DDP + Megatron's AdamW on one fixed batch; returns the loss before each step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_tiny_gpt()
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32
        ),
        [ddp],
    )
    tokens, labels, position_ids = random_batch()
    losses = []
    for _ in range(num_steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens, position_ids, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, grad_norm, _ = optimizer.step()
        if not ok or not torch.isfinite(torch.tensor(grad_norm)):
            raise RuntimeError(f"optimizer step failed: ok={ok} grad_norm={grad_norm}")
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    start = time.perf_counter()
    losses, _ = run_distributed(train_steps, world_size=2, layout=ParallelLayout(tp=2), args=(args.steps,))
    for step, loss in enumerate(losses):
        print(f"step {step:3d}  loss {loss:.4f}")
    print(
        f"Megatron TP=2 smoke run: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
