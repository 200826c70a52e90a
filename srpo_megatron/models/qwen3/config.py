"""HF Qwen3 ``config.json`` -> a validated architecture record -> Megatron ``TransformerConfig``.

Two HF architectures share one record: the dense Qwen3 (``model_type`` "qwen3",
``Qwen3ForCausalLM``) and Qwen3-MoE ("qwen3_moe", ``Qwen3MoeForCausalLM``: the same attention,
and a mixture of experts in place of the MLP in its sparse layers). The HF config is taken as the
plain dict of ``config.json`` (what checkpoints carry and what our Megatron checkpoints store in
``srpo_meta.json``); a transformers ``PretrainedConfig`` is accepted too. Both spellings of RoPE
settings are read: ``rope_theta`` (transformers 4.x, hub configs) and ``rope_parameters.rope_theta``
(transformers 5); both of the number of experts: ``num_experts`` (hub configs) and
``num_local_experts`` (what transformers 5 writes).

Qwen3-MoE's router, in HF (``Qwen3MoeTopKRouter``) and here through Megatron's ``TopKRouter``::

    p = softmax(h @ W_gate^T)             # [T, E], over all experts, in fp32
    top = topk(p, k)                      # the k experts of each token
    w = p[top] / sum(p[top])              # renormalised when norm_topk_prob, else p[top]
    y = sum_top w_e * expert_e(h)

With ``norm_topk_prob`` the weights are a softmax over the k selected logits, which is Megatron's
``moe_router_pre_softmax=False`` (top-k of the logits, then softmax); without it they are the
full softmax's values, ``moe_router_pre_softmax=True``. Top-k of the logits and of the softmax
select the same experts (softmax is monotone).

Parallel layouts supported (checked by ``Qwen3Arch.check_layout``): TP must divide the attention
heads, the KV heads (no KV-head replication: TP <= num_key_value_heads) and the FFN sizes (the
dense ``intermediate_size`` where a layer is dense, the experts' ``moe_intermediate_size``: the
experts are tensor-parallel over the same TP ranks); PP must divide the number of layers (even
split, no uneven first/last stages); EP must divide the number of experts (each EP rank holds
``num_experts / EP`` whole experts) and, in the runtime's layout, the data-parallel size
(``runtime.distributed.ParallelLayout``). Megatron's MoE layer also refuses to TRAIN at TP > 1
without ``sequence_parallel=True`` (a ``TransformerConfig`` override); forward passes run either way.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from srpo_megatron.errors import UserError

# model_type -> the HF architecture of that type we run
SUPPORTED_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The dict of ``<hf_dir>/config.json``."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: not an HF model directory")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from None


@dataclass(frozen=True)
class Qwen3Arch:
    """The numbers that define a Qwen3 model, dense or MoE, read and validated from an HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the MLP of the dense layers (a MoE model's too: mlp_only_layers)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # independent of hidden_size / num_heads (Qwen3-8B: 4096 / 32 = 128 = head_dim by chance)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float
    model_type: str = "qwen3"
    # Qwen3-MoE only (0 / False / () for the dense Qwen3)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()  # global indices of the layers whose MLP is the experts

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def hf_architecture(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.model_type]

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any] | Any) -> "Qwen3Arch":
        """Parse ``config.json`` (dict or ``PretrainedConfig``); ValueError on anything we cannot run."""
        cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES or any(
            a != SUPPORTED_ARCHITECTURES[model_type] for a in archs
        ):
            supported = ", ".join(
                f"model_type {t!r} with architectures [{a!r}]" for t, a in SUPPORTED_ARCHITECTURES.items()
            )
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs}; supported: {supported}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}: Qwen3 uses 'silu' (SwiGLU)")
        if cfg.get("attention_bias", False):
            raise ValueError("unsupported attention_bias=True: Qwen3 has no biases")
        if cfg.get("use_sliding_window", False):
            raise ValueError("unsupported use_sliding_window=True: only full attention is implemented")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r} (rope scaling): only 'default' RoPE")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

        num_heads = cfg["num_attention_heads"]
        num_kv_heads = cfg.get("num_key_value_heads") or num_heads
        arch = cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            model_type=model_type,
            **(_moe_fields(cfg) if model_type == "qwen3_moe" else {}),
        )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        return arch

    def check_layout(self, tp: int, pp: int, ep: int = 1) -> None:
        """ValueError unless this model can be split ``tp`` ways by tensor, ``pp`` by pipeline and
        its experts ``ep`` ways (see the module docstring)."""
        sizes = [("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads)]
        if len(self.moe_layers) < self.num_layers:  # some layers are dense
            sizes.append(("intermediate_size", self.intermediate_size))
        if self.is_moe:
            sizes.append(("moe_intermediate_size", self.moe_intermediate_size))
        for what, n in sizes:
            if n % tp:
                raise ValueError(f"TP size {tp} does not divide {what}={n}")
        if self.num_layers % pp:
            raise ValueError(f"PP size {pp} does not divide num_hidden_layers={self.num_layers}")
        if ep > 1 and not self.is_moe:
            raise ValueError(
                f"EP size {ep} needs a mixture-of-experts model; this {self.model_type} has no experts"
            )
        if self.is_moe and self.num_experts % ep:
            raise ValueError(f"EP size {ep} does not divide num_experts={self.num_experts}")


def _moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen3Arch's MoE fields from a qwen3_moe config (HF's defaults where a key is absent)."""
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    top_k = cfg.get("num_experts_per_tok", 8)
    step = cfg.get("decoder_sparse_step", 1)
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    if num_experts and not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
    if step < 1:
        raise ValueError(f"decoder_sparse_step={step} must be >= 1")
    # HF's rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers, every step-th layer
    moe_layers = tuple(
        i
        for i in range(cfg["num_hidden_layers"])
        if i not in dense_layers and num_experts > 0 and (i + 1) % step == 0
    )
    return dict(
        num_experts=num_experts if moe_layers else 0,
        num_experts_per_tok=top_k if moe_layers else 0,
        moe_intermediate_size=cfg.get("moe_intermediate_size", 768) if moe_layers else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers,
    )


def make_transformer_config(
    arch: Qwen3Arch,
    *,
    tp: int,
    pp: int,
    ep: int = 1,
    params_dtype: torch.dtype,
    use_cpu_initialization: bool,
    perform_initialization: bool = True,
    **overrides: Any,
):
    """Megatron ``TransformerConfig`` with Qwen3's architecture for a ``tp`` x ``pp`` (x ``ep``) layout.

    ``overrides`` are extra ``TransformerConfig`` fields the trainer owns (recompute, fusions,
    sequence parallelism, and for a MoE model the router's training knobs: ``moe_aux_loss_coeff``,
    ``moe_z_loss_coeff``, ``moe_router_load_balancing_type``, ``moe_router_dtype``,
    ``moe_token_dispatcher_type``, ``moe_grouped_gemm``, ``moe_enable_routing_replay``, ...); they
    may not change the architecture. Without overrides a MoE model gets Megatron's defaults: no
    auxiliary loss (the "aux_loss" type with coefficient 0 computes nothing), no z-loss, the router
    in the parameters' dtype (as HF's gate), the "allgather" dispatcher (``build_qwen3_model``
    picks one for the device and layout).
    """
    from megatron.core.transformer import TransformerConfig

    arch.check_layout(tp, pp, ep)
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=True,  # Qwen3's per-head q_norm / k_norm (RMSNorm over head_dim)
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # On CPU the full (master) weight is built and then split: the same init at any TP.
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
    if arch.is_moe:
        fields |= dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.num_experts_per_tok,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_layer_freq=[int(i in arch.moe_layers) for i in range(arch.num_layers)],  # 1: experts
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not arch.norm_topk_prob,  # see the module docstring
            moe_shared_expert_intermediate_size=None,  # Qwen3-MoE has no shared expert
            expert_model_parallel_size=ep,
        )
    architecture = set(fields) - {"use_cpu_initialization", "perform_initialization"}
    changed = sorted(k for k in overrides if k in architecture and overrides[k] != fields[k])
    if changed:
        raise ValueError(f"overrides may not change the Qwen3 architecture or layout: {changed}")
    return TransformerConfig(**{**fields, **overrides})
