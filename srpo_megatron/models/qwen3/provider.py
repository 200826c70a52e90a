"""Build Megatron's GPTModel with Qwen3's architecture for the current parallel state.

Call after ``runtime.distributed.init_distributed(ParallelLayout(tp, pp))``. Each PP stage builds
its own layers (``pre_process`` on the first stage: the embedding; ``post_process`` on the last:
final norm + output layer); no virtual pipeline (``vp_stage=None``). The layer spec is Transformer
Engine's on GPU and Megatron's local (pure PyTorch) spec on CPU; both give the same parameters and
the same torch_dist checkpoint keys (the local spec maps its norms onto TE's fused names).

Sequence parallelism (``sequence_parallel=True`` in the overrides, TP > 1) runs on both specs. TE's
norms support it; megatron-core 0.19.2's local spec builds ``WrappedTorchNorm``, which refuses it,
so the local spec here builds its RMSNorms from ``SequenceParallelTorchRMSNorm`` instead.
"""

from typing import Any, Literal

import torch

from srpo_megatron.models.qwen3.config import Qwen3Arch, make_transformer_config
from srpo_megatron.models.vocab import DEFAULT_VOCAB_DIVISOR, padded_vocab_size

TransformerImpl = Literal["auto", "local", "transformer_engine"]


class SequenceParallelTorchRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm (what Megatron's local spec builds), with the mark sequence parallelism needs.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the weight's
    gradient on a rank is partial. Megatron's ``finalize_model_grads`` sums, over TP, the gradients
    of the parameters marked ``sequence_parallel`` (TE's and apex's norms set the mark);
    ``WrappedTorchNorm`` does not, and asserts that sequence parallelism is off. The q/k norms are
    summed over TP by name in any case (each rank holds other heads); marking them changes nothing.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused_megatron_args):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(transformer_impl: TransformerImpl = "auto"):
    """The Qwen3 layer spec: TE on GPU, local on CPU ("auto"); no silent fallback if TE is missing."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if torch.cuda.is_available() else "local"
    if transformer_impl == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
        layer, attention = spec.submodules, spec.submodules.self_attention.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelTorchRMSNorm
        attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchRMSNorm
        return spec
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not installed; "
                "pass transformer_impl='local' to run on Megatron's local spec"
            ) from e
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    raise ValueError(
        f"unknown transformer_impl {transformer_impl!r}: 'auto', 'local' or 'transformer_engine'"
    )


def build_qwen3_model(
    hf_config: dict[str, Any] | Any,
    *,
    params_dtype: torch.dtype = torch.bfloat16,
    transformer_impl: TransformerImpl = "auto",
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    init_weights: bool = True,
    **config_overrides: Any,
):
    """This rank's Megatron ``GPTModel`` stage of the Qwen3 described by ``hf_config``.

    hf_config: the ``config.json`` dict (or a transformers config). params_dtype: dtype of the
    parameters. init_weights=False skips the random init (weights are loaded right after).
    config_overrides: extra ``TransformerConfig`` fields (fusions, recompute, ...).
    The vocabulary is padded to ``padded_vocab_size(V, tp, make_vocab_size_divisible_by)``; the
    model's ``vocab_size`` attribute is the padded size, ``hf_vocab_size`` the true one.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    arch = Qwen3Arch.from_hf(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = make_transformer_config(
        arch,
        tp=tp,
        pp=pp,
        params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init_weights,
        **config_overrides,
    )
    spec = layer_spec(transformer_impl)
    if spec.submodules.input_layernorm is SequenceParallelTorchRMSNorm:
        # The block's final norm too (Megatron would pick WrappedTorchNorm for it without TE / apex).
        layers = [spec] * get_num_layers_to_build(config)
        spec = TransformerBlockSubmodules(layer_specs=layers, layer_norm=SequenceParallelTorchRMSNorm)
    model = GPTModel(
        config,
        spec,
        vocab_size=padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        vp_stage=None,
    )
    # Megatron's local spec builds its norms (torch.nn.RMSNorm) in fp32 whatever params_dtype; TE's
    # follow params_dtype. Cast them, so that both specs hold one dtype, as Megatron's own
    # Float16Module would (bf16 weights; the norms still reduce in fp32 inside the kernel).
    for param in model.parameters():
        if param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)
    model.hf_vocab_size = arch.vocab_size
    return model
