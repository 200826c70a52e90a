"""Our Megatron Qwen3-MoE vs HF's ``Qwen3MoeForCausalLM``: log-probs and the exporter's tensors at
TP / PP / EP in {1, 2} (EP=2: the experts split over 2 gloo ranks), and the parameter counts of
Qwen3-30B-A3B and Qwen3-235B-A22B built on the meta device."""

import json
from pathlib import Path

import pytest
import torch
from tiny_qwen3 import megatron_logprobs, tiny_qwen3_moe_config

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed

VOCAB, BATCH, SEQ = 1100, 3, 16
MODELS = Path(__file__).parents[2] / "configs" / "models"


def make_hf_moe_model(hf_dir, *, tied: bool = False, seed: int = 5):
    """A tiny random fp32 Qwen3-MoE saved as safetensors: 4 layers, layer 2 dense (mlp_only_layers),
    4 experts top-2; weights large enough that a wrong mapping or routing cannot hide."""
    from transformers import Qwen3MoeForCausalLM

    config = tiny_qwen3_moe_config(
        vocab_size=VOCAB,
        num_hidden_layers=4,
        mlp_only_layers=[2],
        tie_word_embeddings=tied,
        rope_theta=100_000.0,
        rms_norm_eps=1e-6,
        dtype="float32",
        architectures=["Qwen3MoeForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)
    return model


def make_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def hf_logprobs(model, tokens, labels):
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()  # [B, S, V]
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]  # [B, S]


def _parity_rank(hf_dir: str):
    """Log-probs, which exported tensors equal HF's file, and whether this rank must export."""
    from safetensors.torch import load_file

    from srpo_megatron.models.qwen3.config import load_hf_config
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors, is_exporting_rank
    from srpo_megatron.models.qwen3.loader import load_hf_weights
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    config = load_hf_config(hf_dir)
    model = build_qwen3_model(config, params_dtype=torch.float32).eval()
    load_hf_weights(model, hf_dir)
    num_local_experts = {
        len(layer.mlp.experts.local_experts) for layer in model.decoder.layers if hasattr(layer.mlp, "router")
    }
    logp = megatron_logprobs(model, *make_batch(), VOCAB)
    reference = load_file(f"{hf_dir}/model.safetensors")
    exported = {name: torch.equal(t, reference[name]) for name, t in export_hf_tensors(model, config)}
    return logp, exported, is_exporting_rank(), num_local_experts


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf_moe")
    model = make_hf_moe_model(hf_dir)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "Qwen3MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"
    ]  # fmt: skip
    return str(hf_dir), hf_logprobs(model, *make_batch())


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_logprobs_and_export_match_hf(hf_moe, tp, pp, ep):
    from safetensors import safe_open

    hf_dir, reference = hf_moe
    per_rank = run_distributed(
        _parity_rank, world_size=tp * pp * ep, layout=ParallelLayout(tp, pp, ep), args=(hf_dir,)
    )
    logps = [logp for logp, *_ in per_rank if logp is not None]
    assert len(logps) == tp * ep  # every TP rank of the last stage, on each data-parallel rank
    for logp in logps:
        torch.testing.assert_close(logp, reference, atol=1e-4, rtol=0)
    assert all(exporting for _, _, exporting, _ in per_rank)  # one copy of the model: all must iterate
    assert set().union(*(n for *_, n in per_rank)) == {4 // ep}  # each rank holds E/ep experts
    exported = {}
    for _, tensors, _, _ in per_rank:
        assert not exported.keys() & tensors.keys(), "a tensor was exported by two ranks"
        exported |= tensors
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        assert exported.keys() == set(f.keys())
    assert all(exported.values()), [n for n, ok in exported.items() if not ok]


def _count_on_meta(configs):
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    counts = []
    for config in configs:
        with torch.device("meta"):
            # divisor 1: no vocabulary padding, so the count is comparable with HF's
            model = build_qwen3_model(config, init_weights=False, make_vocab_size_divisible_by=1)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        counts.append(sum(p.numel() for p in model.parameters()))
        del model
    return counts


def test_parameter_counts_of_qwen3_30b_a3b_and_235b_a22b_match_hf():
    """Built on the meta device, whole (TP = PP = EP = 1), against transformers' own model on meta
    and the published 30,532,122,624 of Qwen3-30B-A3B: 48 x (attention 18,874,368 + norms 4,352 +
    router 262,144 + 128 experts x 3 x 768 x 2048) + 2 x 151,936 x 2048 (untied) + 2048."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from srpo_megatron.models.qwen3.config import Qwen3Arch
    from srpo_megatron.models.qwen3.mapping import count_megatron_params

    configs = [
        json.loads((MODELS / name / "config.json").read_text())
        for name in ("qwen3_30b_a3b", "qwen3_235b_a22b")
    ]
    expected = []
    for config in configs:
        with torch.device("meta"):
            hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
        expected.append(sum(p.numel() for p in hf.parameters()))
    (counts,) = run_distributed(_count_on_meta, world_size=1, args=(configs,), timeout=600)
    assert counts == expected
    assert expected[0] == 30_532_122_624  # Qwen3-30B-A3B's published size
    assert [count_megatron_params(Qwen3Arch.from_hf(c), c["vocab_size"]) for c in configs] == expected
