"""Qwen3-MoE without processes: the HF config read into Qwen3Arch (which layers are sparse, both
spellings of the expert count), the layouts refused, Megatron's router settings, and the expert
names of both layer specs mapped to every HF tensor once, sliced and merged back at any TP."""

import pytest
import torch
from tiny_qwen3 import TINY_QWEN3_MOE

from srpo_megatron.models.qwen3.config import Qwen3Arch, make_transformer_config
from srpo_megatron.models.qwen3.mapping import hf_tensor_shapes, map_params, merge_shards, read_shard
from srpo_megatron.models.vocab import padded_vocab_size

HF_CONFIG = {
    **TINY_QWEN3_MOE,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 1100,
    "num_hidden_layers": 4,
    "mlp_only_layers": [2],
}
ATTENTION = [
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
]
DENSE_MLP = ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]


def sequential_experts(num_local):  # the local spec (SequentialMLP)
    return [f"mlp.experts.local_experts.{j}.linear_fc{fc}.weight" for j in range(num_local) for fc in (1, 2)]


def grouped_experts(num_local):  # TE's grouped GEMM (TEGroupedMLP)
    return [f"mlp.experts.linear_fc{fc}.weight{j}" for fc in (1, 2) for j in range(num_local)]


class _FakeMoeStage(torch.nn.Module):
    """The parameter names of a GPTModel stage holding EP rank ``ep_rank``'s experts."""

    def __init__(self, arch, layer_numbers, experts, ep_rank, ep, pre, post):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList()
        num_local = arch.num_experts // ep
        self._names = ["embedding.word_embeddings.weight"] if pre else []
        for pos, number in enumerate(layer_numbers):
            layer = torch.nn.Module()
            layer.layer_number = number
            layer.mlp = torch.nn.Module()
            if number - 1 in arch.moe_layers:
                layer.mlp.local_expert_indices = [ep_rank * num_local + j for j in range(num_local)]
                mlp = ["mlp.router.weight", *experts(num_local)]
            else:
                mlp = DENSE_MLP
            self.decoder.layers.append(layer)
            self._names += [f"decoder.layers.{pos}.{n}" for n in ATTENTION + mlp]
        self._names += ["decoder.final_layernorm.weight", "output_layer.weight"] if post else []

    def named_parameters(self, *args, **kwargs):
        return [(n, None) for n in self._names]


def test_sparse_layers_and_expert_count_are_read_as_hf_does():
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size) == (4, 2, 32)
    assert arch.moe_layers == (0, 1, 3) and arch.is_moe and arch.hf_architecture == "Qwen3MoeForCausalLM"
    # transformers 5 writes num_local_experts; HF's rule: sparse where (i + 1) % decoder_sparse_step == 0
    spelled = {k: v for k, v in HF_CONFIG.items() if k != "num_experts"} | {"num_local_experts": 4}
    assert Qwen3Arch.from_hf(spelled | {"decoder_sparse_step": 2}).moe_layers == (1, 3)
    assert not Qwen3Arch.from_hf(HF_CONFIG | {"num_experts": 0}).is_moe
    with pytest.raises(ValueError, match="architectures"):
        Qwen3Arch.from_hf(HF_CONFIG | {"architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        Qwen3Arch.from_hf(HF_CONFIG | {"num_experts_per_tok": 5})


def test_layouts_the_experts_cannot_take_are_refused():
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    arch.check_layout(tp=2, pp=2, ep=4)
    with pytest.raises(ValueError, match="EP size 3 does not divide num_experts=4"):
        arch.check_layout(1, 1, ep=3)
    with pytest.raises(ValueError, match="TP size 2 does not divide moe_intermediate_size=33"):
        Qwen3Arch.from_hf(HF_CONFIG | {"moe_intermediate_size": 33}).check_layout(2, 1)
    dense = Qwen3Arch.from_hf({**HF_CONFIG, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(ValueError, match="EP size 2 needs a mixture-of-experts model"):
        dense.check_layout(1, 1, ep=2)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_settings_follow_norm_topk_prob(norm_topk_prob):
    arch = Qwen3Arch.from_hf(HF_CONFIG | {"norm_topk_prob": norm_topk_prob})
    config = make_transformer_config(
        arch,
        tp=1,
        pp=1,
        ep=2,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        moe_aux_loss_coeff=1e-3,
    )
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 32)
    assert config.moe_layer_freq == [1, 1, 0, 1] and config.expert_model_parallel_size == 2
    assert config.moe_router_score_function == "softmax"
    assert config.moe_router_pre_softmax is not norm_topk_prob  # renormalised = softmax over the top k
    assert config.moe_aux_loss_coeff == 1e-3 and config.moe_z_loss_coeff is None
    with pytest.raises(ValueError, match="moe_router_topk"):
        make_transformer_config(
            arch, tp=1, pp=1, params_dtype=torch.float32, use_cpu_initialization=True, moe_router_topk=1
        )


@pytest.mark.parametrize("experts", [sequential_experts, grouped_experts], ids=["sequential", "grouped"])
def test_expert_names_map_to_every_hf_tensor_once(experts):
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    stages = [  # PP=2 x EP=2
        _FakeMoeStage(arch, layers, experts, ep_rank, 2, pre=layers[0] == 1, post=layers[0] == 3)
        for layers in ([1, 2], [3, 4])
        for ep_rank in range(2)
    ]
    hf_names = [n for stage in stages for pm in map_params(stage) for n in pm.hf_names]
    hf_names = set(hf_names) | {n for n in hf_names if ".experts." not in n}  # replicated over EP
    assert sorted(set(hf_names)) == sorted(hf_tensor_shapes(arch))
    expert_maps = [pm for pm in map_params(stages[1]) if pm.expert is not None]  # EP rank 1, layers 0, 1
    assert {pm.expert for pm in expert_maps} == {2, 3}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in [n for pm in expert_maps for n in pm.hf_names]


@pytest.mark.parametrize("tp", [1, 2])  # 2 KV heads
def test_expert_shards_merge_back_to_the_hf_tensors(tp):
    arch = Qwen3Arch.from_hf(HF_CONFIG)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in hf_tensor_shapes(arch).items()}
    read = lambda name, rows, cols: hf[name][rows] if hf[name].dim() == 1 else hf[name][rows, cols]
    padded = padded_vocab_size(arch.vocab_size, tp)
    stage = _FakeMoeStage(arch, [1, 2, 3, 4], sequential_experts, 0, 1, pre=True, post=True)
    for pm in map_params(stage):
        shards = [read_shard(pm, read, arch, r, tp, padded) for r in range(tp)]
        if pm.expert is not None and pm.kind == "gate_up":
            assert shards[0].shape == (2 * arch.moe_intermediate_size // tp, arch.hidden_size)
        for name, full in merge_shards(pm, shards, arch):
            assert torch.equal(full, hf[name]), name


def test_checkpoint_names_view_the_fused_experts_of_transformers(tmp_path):
    from safetensors.torch import load_file
    from tiny_qwen3 import tiny_qwen3_moe_config
    from transformers import Qwen3MoeForCausalLM

    from srpo_megatron.models.qwen3.mapping import hf_checkpoint_views

    model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(vocab_size=300, mlp_only_layers=[1]))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    views = hf_checkpoint_views(model)
    assert views.keys() == saved.keys()
    assert all(torch.equal(views[n], saved[n]) for n in saved)
    with torch.no_grad():  # a copy into a view lands in the fused parameter
        views["model.layers.0.mlp.experts.3.up_proj.weight"].fill_(7.0)
    ffn = model.config.moe_intermediate_size
    assert (model.model.layers[0].mlp.experts.gate_up_proj[3, ffn:] == 7.0).all()
