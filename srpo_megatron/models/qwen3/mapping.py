"""HF Qwen3 <-> Megatron GPTModel: names, fusions and TP slicing. Pure tensor code, no communication.

Megatron parameter (per TP rank r of tp)        HF tensor(s)                      how it is split
embedding.word_embeddings.weight [Vp/tp, H]     model.embed_tokens.weight [V, H]   rows; Vp-V zero pad rows
decoder.layers.i.
  input_layernorm.weight (local spec) |         model.layers.i.input_layernorm.weight   replicated
  self_attention.linear_qkv.layer_norm_weight (TE spec)
  self_attention.linear_qkv.weight              self_attn.{q,k,v}_proj.weight      per query group, below
  self_attention.q_layernorm.weight [d]         self_attn.q_norm.weight            replicated
  self_attention.k_layernorm.weight [d]         self_attn.k_norm.weight            replicated
  self_attention.linear_proj.weight             self_attn.o_proj.weight            columns (row-parallel)
  pre_mlp_layernorm.weight (local) |            post_attention_layernorm.weight    replicated
  mlp.linear_fc1.layer_norm_weight (TE)
  mlp.linear_fc1.weight [2F/tp, H]              mlp.{gate,up}_proj.weight [F, H]   [gate_r; up_r]
  mlp.linear_fc2.weight                         mlp.down_proj.weight               columns (row-parallel)
decoder.final_layernorm.weight                  model.norm.weight                  replicated
output_layer.weight [Vp/tp, H]                  lm_head.weight (tied: model.embed_tokens.weight)

Qwen3-MoE, the sparse layers' MLP (the dense ones are as above); EP rank q of ep holds the experts
e = q*E/ep + j, j = 0..E/ep-1 (Megatron's ``local_expert_indices``), tensor-parallel like the MLP:
decoder.layers.i.
  mlp.router.weight [E, H]                      mlp.gate.weight [E, H]             replicated
  mlp.experts.local_experts.j.linear_fc1.weight (SequentialMLP) |
  mlp.experts.linear_fc1.weight<j> (TEGroupedMLP)
                    [2F/tp, H]                  mlp.experts.e.{gate,up}_proj.weight [F, H]   [gate_r; up_r]
  mlp.experts.local_experts.j.linear_fc2.weight |
  mlp.experts.linear_fc2.weight<j>              mlp.experts.e.down_proj.weight     columns (row-parallel)
(F: moe_intermediate_size.)

QKV: Megatron's ``linear_qkv`` rows are grouped by KV head (query group) g = 0..G-1, each group
``[q heads g*Q/G .. (g+1)*Q/G - 1 ; k_g ; v_g]`` of ``head_dim`` rows per head; TP rank r holds the
contiguous groups ``r*G/tp .. (r+1)*G/tp - 1``. ``i`` is the GLOBAL layer index (``layer_number -
1`` of the Megatron layer), so PP stages need no offset arithmetic.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from srpo_megatron.models.qwen3.config import Qwen3Arch

# kinds of Megatron parameters
REPLICATED, VOCAB, QKV, GATE_UP, ROW = "replicated", "vocab", "qkv", "gate_up", "row"

_LAYER_PARAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": (REPLICATED, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": (REPLICATED, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        QKV,
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.q_layernorm.weight": (REPLICATED, ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": (REPLICATED, ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": (ROW, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (REPLICATED, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": (REPLICATED, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": (GATE_UP, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (ROW, ("mlp.down_proj.weight",)),
    "mlp.router.weight": (REPLICATED, ("mlp.gate.weight",)),
}
# An expert's linear_fc1 / linear_fc2: SequentialMLP's names, then TEGroupedMLP's; (local index, 1|2)
_EXPERT_PARAM = (
    re.compile(r"mlp\.experts\.local_experts\.(?P<j>\d+)\.linear_fc(?P<fc>[12])\.weight"),
    re.compile(r"mlp\.experts\.linear_fc(?P<fc>[12])\.weight(?P<j>\d+)"),
)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter of this rank and the HF tensors it is made of."""

    mcore_name: str
    kind: str
    hf_names: tuple[str, ...]
    # output_layer.weight on the last PP stage when embeddings are tied: a copy of the embedding
    # that is loaded but never exported (HF ties lm_head to embed_tokens itself).
    tied_copy: bool = False
    layer: int | None = None  # global layer index (decoder parameters)
    expert: int | None = None  # global expert index (an expert's linear_fc1 / linear_fc2)


def expert_param_map(mcore_name: str, layer: int, expert: int, fc: int) -> ParamMap:
    """The ``ParamMap`` of global expert ``expert``'s linear_fc``fc`` in layer ``layer``."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    if fc == 1:
        return ParamMap(
            mcore_name,
            GATE_UP,
            (prefix + "gate_proj.weight", prefix + "up_proj.weight"),
            layer=layer,
            expert=expert,
        )
    return ParamMap(mcore_name, ROW, (prefix + "down_proj.weight",), layer=layer, expert=expert)


def hf_tensor_shapes(arch: Qwen3Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint, in HF order, with its shape."""
    h, d, f, fe = arch.hidden_size, arch.head_dim, arch.intermediate_size, arch.moe_intermediate_size
    shapes = {EMBED: (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_heads * d, h),
            p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if i in arch.moe_layers:
            shapes[p + "mlp.gate.weight"] = (arch.num_experts, h)
            for e in range(arch.num_experts):
                shapes |= {
                    f"{p}mlp.experts.{e}.gate_proj.weight": (fe, h),
                    f"{p}mlp.experts.{e}.up_proj.weight": (fe, h),
                    f"{p}mlp.experts.{e}.down_proj.weight": (h, fe),
                }
        else:
            shapes |= {
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes[LM_HEAD] = (arch.vocab_size, h)
    return shapes


def hf_checkpoint_views(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of a transformers ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` under their
    checkpoint names (the exporter's, SGLang's), as views: copying into a view updates the model.

    transformers 5 holds a MoE layer's experts fused, ``mlp.experts.gate_up_proj`` [E, 2F, H]
    (``[gate_e; up_e]`` per expert) and ``mlp.experts.down_proj`` [E, H, F], and converts them
    from and to the per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` of checkpoints when
    it loads and saves. Every other parameter is its own view, under its own name.
    """
    views = {}
    for name, param in hf_model.named_parameters():
        prefix, _, leaf = name.rpartition(".experts.")
        if leaf == "gate_up_proj":
            ffn = param.shape[1] // 2
            for e, gate_up in enumerate(param):  # [2F, H]
                views[f"{prefix}.experts.{e}.gate_proj.weight"] = gate_up[:ffn]
                views[f"{prefix}.experts.{e}.up_proj.weight"] = gate_up[ffn:]
        elif leaf == "down_proj":
            views |= {f"{prefix}.experts.{e}.down_proj.weight": down for e, down in enumerate(param)}
        else:
            views[name] = param
    return views


def count_megatron_params(arch: Qwen3Arch, padded_vocab: int) -> int:
    """Parameters of the whole Megatron model (all TP ranks and PP stages, once each): the HF
    tensors plus the padding rows of the embedding and, when untied, of the output layer."""
    hf = sum(math.prod(shape) for shape in hf_tensor_shapes(arch).values())
    padded_tables = 1 if arch.tie_word_embeddings else 2
    return hf + padded_tables * (padded_vocab - arch.vocab_size) * arch.hidden_size


def map_params(model: torch.nn.Module) -> list[ParamMap]:
    """The ``ParamMap`` of every parameter of this rank's model, in Megatron (= HF) order.

    ``model`` is the bare GPTModel of this PP stage (unwrap DDP / Float16Module first). Raises
    ValueError for a parameter we do not know how to map. Experts: this rank's only, under their
    global indices.
    """
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    maps = []
    for name, _ in model.named_parameters():
        if name == "embedding.word_embeddings.weight":
            maps.append(ParamMap(name, VOCAB, (EMBED,)))
        elif name == "output_layer.weight":
            maps.append(ParamMap(name, VOCAB, (EMBED,) if tied else (LM_HEAD,), tied_copy=tied))
        elif name == "decoder.final_layernorm.weight":
            maps.append(ParamMap(name, REPLICATED, ("model.norm.weight",)))
        elif name.startswith("decoder.layers."):
            _, _, pos, suffix = name.split(".", 3)
            layer = model.decoder.layers[int(pos)]
            index = layer.layer_number - 1  # the global layer index
            expert = next((m for m in (r.fullmatch(suffix) for r in _EXPERT_PARAM) if m), None)
            if expert is not None:
                global_expert = layer.mlp.local_expert_indices[int(expert["j"])]
                maps.append(expert_param_map(name, index, global_expert, int(expert["fc"])))
                continue
            if suffix not in _LAYER_PARAMS:
                raise ValueError(f"Megatron parameter {name!r} has no HF counterpart in the Qwen3 mapping")
            kind, hf_suffixes = _LAYER_PARAMS[suffix]
            prefix = f"model.layers.{index}."
            maps.append(ParamMap(name, kind, tuple(prefix + s for s in hf_suffixes), layer=index))
        else:
            raise ValueError(f"Megatron parameter {name!r} has no HF counterpart in the Qwen3 mapping")
    return maps


# A reader of HF tensors: read(name, rows, cols) -> that slice of the tensor only.
ReadSlice = Callable[[str, slice, slice], torch.Tensor]
_ALL = slice(None)


def read_shard(
    pm: ParamMap, read: ReadSlice, arch: Qwen3Arch, tp_rank: int, tp: int, padded_vocab: int
) -> torch.Tensor:
    """This TP rank's shard of Megatron parameter ``pm``, reading only the HF slices it needs
    (an expert's: ``tp_rank`` / ``tp`` of the expert tensor-parallel group)."""
    if pm.kind == REPLICATED:
        return read(pm.hf_names[0], _ALL, _ALL)
    if pm.kind == VOCAB:
        rows = padded_vocab // tp
        start, stop = tp_rank * rows, min((tp_rank + 1) * rows, arch.vocab_size)
        real = read(pm.hf_names[0], slice(start, max(start, stop)), _ALL)  # [<=Vp/tp, H]
        pad = real.new_zeros(rows - real.shape[0], real.shape[1])
        return torch.cat([real, pad]) if pad.numel() else real
    ffn = arch.moe_intermediate_size if pm.expert is not None else arch.intermediate_size
    if pm.kind == ROW:
        hf_name = pm.hf_names[0]
        cols = (arch.num_heads * arch.head_dim if "o_proj" in hf_name else ffn) // tp
        return read(hf_name, _ALL, slice(tp_rank * cols, (tp_rank + 1) * cols))
    if pm.kind == GATE_UP:
        rows = ffn // tp
        part = slice(tp_rank * rows, (tp_rank + 1) * rows)
        return torch.cat([read(pm.hf_names[0], part, _ALL), read(pm.hf_names[1], part, _ALL)])
    if pm.kind == QKV:
        d, groups = arch.head_dim, arch.num_kv_heads // tp
        q_per_group = arch.num_heads // arch.num_kv_heads
        g0 = tp_rank * groups
        q = read(pm.hf_names[0], slice(g0 * q_per_group * d, (g0 + groups) * q_per_group * d), _ALL)
        k = read(pm.hf_names[1], slice(g0 * d, (g0 + groups) * d), _ALL)
        v = read(pm.hf_names[2], slice(g0 * d, (g0 + groups) * d), _ALL)
        h = q.shape[1]
        qkv = torch.cat([q.view(groups, q_per_group * d, h), k.view(groups, d, h), v.view(groups, d, h)], 1)
        return qkv.view(-1, h)  # [groups * (Q/G + 2) * d, H]
    raise AssertionError(f"unknown kind {pm.kind}")


def is_tp_sharded(pm: ParamMap) -> bool:
    return pm.kind != REPLICATED


def merge_shards(pm: ParamMap, shards: list[torch.Tensor], arch: Qwen3Arch) -> list[tuple[str, torch.Tensor]]:
    """The full HF tensors of ``pm`` from the shards of all TP ranks (in TP rank order)."""
    if pm.kind == REPLICATED:
        return [(pm.hf_names[0], shards[0])]
    if pm.kind == VOCAB:
        return [(pm.hf_names[0], torch.cat(shards)[: arch.vocab_size])]
    if pm.kind == ROW:
        return [(pm.hf_names[0], torch.cat(shards, dim=1))]
    if pm.kind == GATE_UP:
        halves = [s.chunk(2) for s in shards]  # [gate_r; up_r] per rank
        gate = torch.cat([g for g, _ in halves])
        up = torch.cat([u for _, u in halves])
        return list(zip(pm.hf_names, (gate, up), strict=True))
    if pm.kind == QKV:
        d, q_per_group, h = arch.head_dim, arch.num_heads // arch.num_kv_heads, shards[0].shape[1]
        grouped = torch.cat(shards).view(arch.num_kv_heads, (q_per_group + 2) * d, h)
        q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
        return list(zip(pm.hf_names, (q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)), strict=True))
    raise AssertionError(f"unknown kind {pm.kind}")
