"""Build Megatron's GPTModel with Qwen3's architecture for the current parallel state.

Call after ``runtime.distributed.init_distributed(ParallelLayout(tp, pp))``. Each PP stage builds
its own layers (``pre_process`` on the first stage: the embedding; ``post_process`` on the last:
final norm + output layer); no virtual pipeline (``vp_stage=None``). The layer spec is Transformer
Engine's on GPU and Megatron's local (pure PyTorch) spec on CPU; both give the same parameters and
the same torch_dist checkpoint keys (the local spec maps its norms onto TE's fused names).

Sequence parallelism (``sequence_parallel=True`` in the overrides, TP > 1) runs on both specs. TE's
norms support it; megatron-core 0.19.2's local spec builds ``WrappedTorchNorm``, which refuses it,
so the local spec here builds its RMSNorms from ``SequenceParallelTorchRMSNorm`` instead.

Qwen3-MoE: its sparse layers take Megatron's MoE layer spec (``MoELayer``: ``TopKRouter``, the
token dispatcher, the experts), its dense layers (``mlp_only_layers``) the dense spec; each stage
builds the specs of its own layers. The experts are TE's grouped GEMM (``TEGroupedMLP``, one
kernel for all local experts) on the TE spec and Megatron's ``SequentialMLP`` (one ``MLP`` per
local expert, run in turn) on the local spec: ``moe_grouped_gemm`` defaults to which spec is
built. Both save the same torch_dist keys (Megatron maps grouped weights onto per-expert ones).
The token dispatcher: ``token_dispatcher_for``.
Call after ``init_distributed(ParallelLayout(tp, pp, ep))``: EP comes from Megatron's parallel state.
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


def resolve_transformer_impl(transformer_impl: TransformerImpl) -> str:
    """ "auto" -> "transformer_engine" on GPU, "local" on CPU; no silent fallback if TE is missing."""
    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if torch.cuda.is_available() else "local"
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not installed; "
                "pass transformer_impl='local' to run on Megatron's local spec"
            ) from e
    elif transformer_impl != "local":
        raise ValueError(
            f"unknown transformer_impl {transformer_impl!r}: 'auto', 'local' or 'transformer_engine'"
        )
    return transformer_impl


def layer_spec(
    transformer_impl: TransformerImpl = "auto",
    *,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
):
    """The spec of one Qwen3 layer: TE on GPU, local on CPU ("auto"); with ``num_experts``, a layer
    whose MLP is Megatron's MoE layer."""
    from megatron.core.models.gpt import gpt_layer_specs

    transformer_impl = resolve_transformer_impl(transformer_impl)
    if transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, qk_layernorm=True, normalization="RMSNorm"
    )
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelTorchRMSNorm
    attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchRMSNorm
    if num_experts:
        # The local spec saves pre_mlp_layernorm under TE's name for a fused norm + linear_fc1,
        # which a MoE layer does not have: TE's MoE layer keeps pre_mlp_layernorm. Keep it too,
        # so that a checkpoint written on one spec loads on the other.
        layer.sharded_state_dict_keys_map = {
            k: v for k, v in layer.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
        }
    return spec


def block_spec(arch: Qwen3Arch, config, transformer_impl: str):
    """The layer specs of this PP stage's layers (MoE or dense each, by global index) and the
    final norm: Megatron's ``TransformerBlockSubmodules``."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = layer_spec(transformer_impl)
    moe = dense
    if arch.is_moe:
        moe = layer_spec(
            transformer_impl, num_experts=arch.num_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    first = get_transformer_layer_offset(config)
    layers = [
        moe if i in arch.moe_layers else dense for i in range(first, first + get_num_layers_to_build(config))
    ]
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        # The block's final norm too (Megatron would pick WrappedTorchNorm for it without TE / apex).
        final_norm = SequenceParallelTorchRMSNorm
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def token_dispatcher_for(tp: int) -> str:
    """Megatron's MoE token dispatcher for this device and TP size.

    "alltoall" (each token goes to the EP ranks of its experts, and only there: the dispatcher of
    expert-parallel training) wherever it runs: on GPUs, and on CPU at TP = 1 (any EP; the shim in
    runtime/cpu.py gives its split sizes to gloo as numpy, as the GPU path does). On CPU at TP > 1,
    "allgather": with sequence parallelism (which MoE training at TP > 1 needs) the TP ranks route
    different tokens, and the alltoall dispatcher then all-gathers and reduce-scatters uneven
    splits over the TP group, which gloo's all_gather refuses ("invalid tensor size"; NCCL takes
    uneven splits). The allgather dispatcher gathers every rank's tokens in equal parts: more
    traffic, which does not matter on one CPU machine. Both give the same gradients
    (tests/models/test_qwen3_moe_ep.py).
    """
    return "alltoall" if torch.cuda.is_available() or tp == 1 else "allgather"


def check_token_dispatcher(dispatcher: str, tp: int, overrides: dict[str, Any]) -> None:
    """ValueError for the alltoall dispatcher where gloo cannot run it (``token_dispatcher_for``)."""
    if (
        dispatcher == "alltoall"
        and not torch.cuda.is_available()
        and tp > 1
        and overrides.get("sequence_parallel")
    ):
        raise ValueError(
            "moe_token_dispatcher_type='alltoall' with TP > 1 and sequence parallelism needs uneven "
            "all-gathers over the TP group, which gloo (CPU) does not do: use 'allgather' on CPU"
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
    config_overrides: extra ``TransformerConfig`` fields (fusions, recompute, sequence parallelism;
    the router's losses, dtype, dispatcher, replay: ``make_transformer_config``).
    The vocabulary is padded to ``padded_vocab_size(V, tp, make_vocab_size_divisible_by)``; the
    model's ``vocab_size`` attribute is the padded size, ``hf_vocab_size`` the true one.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    arch = Qwen3Arch.from_hf(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    transformer_impl = resolve_transformer_impl(transformer_impl)
    if arch.is_moe:
        # TE's grouped GEMM where TE is; Megatron's local spec has only the sequential experts
        config_overrides.setdefault("moe_grouped_gemm", transformer_impl == "transformer_engine")
        if config_overrides["moe_grouped_gemm"] and transformer_impl != "transformer_engine":
            raise ValueError("moe_grouped_gemm=True needs transformer_impl='transformer_engine'")
        config_overrides.setdefault("moe_token_dispatcher_type", token_dispatcher_for(tp))
        check_token_dispatcher(config_overrides["moe_token_dispatcher_type"], tp, config_overrides)
    config = make_transformer_config(
        arch,
        tp=tp,
        pp=pp,
        ep=ep,
        params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init_weights,
        **config_overrides,
    )
    spec = block_spec(arch, config, transformer_impl)
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
