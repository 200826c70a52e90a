"""The HF <-> Megatron mapping alone (no processes): names under both layer specs, and slicing
HF tensors into TP shards then merging the shards back is the identity, padding included."""

import pytest
import torch
from tiny_qwen3 import TINY_QWEN3, mask_padded_vocab

from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.mapping import (
    count_megatron_params,
    hf_tensor_shapes,
    map_params,
    merge_shards,
    read_shard,
)
from srpo_megatron.models.vocab import padded_vocab_size

HF_CONFIG = {
    **TINY_QWEN3,
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 1100,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
LOCAL_LAYER = [
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
]
TE_LAYER = [
    "self_attention.linear_qkv.layer_norm_weight",
    *LOCAL_LAYER[1:5],
    "mlp.linear_fc1.layer_norm_weight",
    *LOCAL_LAYER[6:],
]


class _FakeStage(torch.nn.Module):
    """Just the parameter names and layer numbers of a GPTModel stage."""

    def __init__(self, layer_names, layer_numbers, pre, post):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList()
        for number in layer_numbers:
            layer = torch.nn.Module()
            layer.layer_number = number
            self.decoder.layers.append(layer)
        self._names = (["embedding.word_embeddings.weight"] if pre else []) + [
            f"decoder.layers.{i}.{n}" for i in range(len(layer_numbers)) for n in layer_names
        ]
        self._names += ["decoder.final_layernorm.weight", "output_layer.weight"] if post else []

    def named_parameters(self, *args, **kwargs):
        return [(n, None) for n in self._names]


@pytest.mark.parametrize("layer_names", [LOCAL_LAYER, TE_LAYER], ids=["local", "te"])
def test_both_specs_map_to_every_hf_tensor_once(layer_names):
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    stages = [_FakeStage(layer_names, [1], True, False), _FakeStage(layer_names, [2], False, True)]  # PP=2
    hf_names = [n for stage in stages for pm in map_params(stage) for n in pm.hf_names]
    assert sorted(hf_names) == sorted(hf_tensor_shapes(arch))
    assert "model.layers.1.post_attention_layernorm.weight" in hf_names  # the global layer index


def test_unknown_parameter_is_named():
    stage = _FakeStage([*LOCAL_LAYER, "mlp.shared_experts.linear_fc1.weight"], [1], True, True)
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.shared_experts.linear_fc1.weight"):
        map_params(stage)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_merge_back_to_the_hf_tensors(tp):
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in hf_tensor_shapes(arch).items()}
    read = lambda name, rows, cols: hf[name][rows] if hf[name].dim() == 1 else hf[name][rows, cols]
    padded = padded_vocab_size(arch.vocab_size, tp)
    for pm in map_params(_FakeStage(LOCAL_LAYER, [1, 2], True, True)):
        shards = [read_shard(pm, read, arch, r, tp, padded) for r in range(tp)]
        assert len({s.shape for s in shards}) == 1
        for name, full in merge_shards(pm, shards, arch):
            assert torch.equal(full, hf[name]), name
    # QKV of TP rank 0: query group 0 is [q heads 0, 1 ; k_0 ; v_0]
    qkv = next(pm for pm in map_params(_FakeStage(LOCAL_LAYER, [1], False, False)) if pm.kind == "qkv")
    shard = read_shard(qkv, read, arch, 0, tp, padded)
    d = arch.head_dim
    assert torch.equal(shard[: 2 * d], hf["model.layers.0.self_attn.q_proj.weight"][: 2 * d])
    assert torch.equal(shard[2 * d : 3 * d], hf["model.layers.0.self_attn.k_proj.weight"][:d])
    assert torch.equal(shard[3 * d : 4 * d], hf["model.layers.0.self_attn.v_proj.weight"][:d])


def test_padded_vocab_is_masked_per_shard():
    assert padded_vocab_size(1100, 1) == 1152 and padded_vocab_size(1100, 2) == 1280
    assert padded_vocab_size(151936, 8, 128) == 151936 + 1024 - 151936 % 1024
    logits = torch.zeros(2, 640)  # TP rank 1 of 2: global ids 640..1279, real up to 1099
    masked = mask_padded_vocab(logits, 1100, vocab_start=640)
    assert (masked[:, :460] == 0).all() and (masked[:, 460:] == torch.finfo(torch.float32).min).all()
    assert mask_padded_vocab(logits, 1100, vocab_start=0) is logits  # rank 0: nothing padded
    assert (mask_padded_vocab(logits, 1100, vocab_start=1280) < -1e38).all()  # a shard of padding only


def test_parameter_count_includes_the_layouts_vocab_padding():
    """HF's counts at TP 1 (151,936 is a multiple of 128); at TP 4 (2) the vocabulary pads to a
    multiple of 512 (256): 152,064, 128 rows more in the embedding and, untied, in the output layer.
    Qwen3-8B is untied (+2 x 128 x 4096), Qwen3-4B tied (+128 x 2560). The dry run's meta-device
    build gives the same 8B figure (tests/trainer/test_run_config.py)."""
    import json
    from pathlib import Path

    models = Path(__file__).parents[2] / "configs" / "models"
    qwen3_8b = Qwen3Arch.from_hf(json.loads((models / "qwen3_8b" / "config.json").read_text()))
    assert count_megatron_params(qwen3_8b, padded_vocab_size(qwen3_8b.vocab_size, 1)) == 8_190_735_360
    assert count_megatron_params(qwen3_8b, padded_vocab_size(qwen3_8b.vocab_size, 4)) == 8_191_783_936
    qwen3_4b = Qwen3Arch.from_hf(json.loads((models / "qwen3_4b" / "config.json").read_text()))
    assert count_megatron_params(qwen3_4b, padded_vocab_size(qwen3_4b.vocab_size, 1)) == 4_022_468_096
    assert count_megatron_params(qwen3_4b, padded_vocab_size(qwen3_4b.vocab_size, 2)) == 4_022_795_776
