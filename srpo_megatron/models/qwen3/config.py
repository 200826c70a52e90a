"""HF Qwen3 ``config.json`` -> a validated architecture record -> Megatron ``TransformerConfig``.

The HF config is taken as the plain dict of ``config.json`` (what checkpoints carry and what our
Megatron checkpoints store in ``srpo_meta.json``); a transformers ``PretrainedConfig`` is accepted
too. Both spellings of RoPE settings are read: ``rope_theta`` (transformers 4.x, hub configs) and
``rope_parameters.rope_theta`` (transformers 5).

Parallel layouts supported (checked by ``Qwen3Arch.check_layout``): TP must divide the attention
heads, the KV heads (no KV-head replication: TP <= num_key_value_heads) and the FFN size; PP must
divide the number of layers (even split, no uneven first/last stages).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from srpo_megatron.errors import UserError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


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
    """The numbers that define a Qwen3 dense model, read and validated from an HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # independent of hidden_size / num_heads (Qwen3-8B: 4096 / 32 = 128 = head_dim by chance)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any] | Any) -> "Qwen3Arch":
        """Parse ``config.json`` (dict or ``PretrainedConfig``); ValueError on anything we cannot run."""
        cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "qwen3" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(
                f"unsupported architecture: model_type={cfg.get('model_type')!r} architectures={archs}; "
                f"supported: model_type 'qwen3' with architectures {list(SUPPORTED_ARCHITECTURES)}"
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
        )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        return arch

    def check_layout(self, tp: int, pp: int) -> None:
        """ValueError unless this model can be split ``tp`` ways by tensor and ``pp`` by pipeline."""
        for what, n in (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if n % tp:
                raise ValueError(f"TP size {tp} does not divide {what}={n}")
        if self.num_layers % pp:
            raise ValueError(f"PP size {pp} does not divide num_hidden_layers={self.num_layers}")


def make_transformer_config(
    arch: Qwen3Arch,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype,
    use_cpu_initialization: bool,
    perform_initialization: bool = True,
    **overrides: Any,
):
    """Megatron ``TransformerConfig`` with Qwen3's architecture for a ``tp`` x ``pp`` layout.

    ``overrides`` are extra ``TransformerConfig`` fields the trainer owns (recompute, fusions,
    sequence parallelism, ...); they may not change the architecture.
    """
    from megatron.core.transformer import TransformerConfig

    arch.check_layout(tp, pp)
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
    architecture = set(fields) - {"use_cpu_initialization", "perform_initialization"}
    changed = sorted(k for k in overrides if k in architecture and overrides[k] != fields[k])
    if changed:
        raise ValueError(f"overrides may not change the Qwen3 architecture or layout: {changed}")
    return TransformerConfig(**{**fields, **overrides})
