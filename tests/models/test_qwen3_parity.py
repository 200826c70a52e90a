"""Our Megatron Qwen3 vs HF's ``Qwen3ForCausalLM``: log-probs at TP/PP in {1, 2}, the exporter's
tensors, and parameter counts of the real 4B/8B shapes built on the meta device."""

import pytest
import torch
from tiny_qwen3 import megatron_logprobs, tiny_qwen3_config

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed

VOCAB, BATCH, SEQ = 1100, 3, 16  # 1100: not a multiple of 128 * tp; padded to 1152 (tp=1), 1280 (tp=2)


def make_hf_model(hf_dir, *, tied: bool, num_layers: int = 4, max_shard_size: str | None = None):
    """A tiny random fp32 Qwen3 (head_dim 24 != 64 / 4 heads; 2 KV groups) saved as safetensors."""
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(
        vocab_size=VOCAB,
        num_hidden_layers=num_layers,
        tie_word_embeddings=tied,
        rope_theta=100_000.0,
        rms_norm_eps=1e-6,
        dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(1 + tied)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from 1, larger weights: a wrong mapping cannot hide
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(hf_dir, **kwargs)
    return model


def make_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    tokens[0, 3] = VOCAB - 1  # the last real id, next to the padding
    return tokens[:, :-1], tokens[:, 1:]


def hf_logprobs(model, tokens, labels):
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()  # [B, S, V]
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]  # [B, S]


def _parity_rank(hf_dirs: dict[bool, str]):
    """Per tied/untied model: log-probs, exported tensors vs HF's, padded embedding rows."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from srpo_megatron.models.qwen3.config import load_hf_config
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.models.qwen3.loader import load_hf_weights
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    tokens, labels = make_batch()
    results = {}
    for tied, hf_dir in hf_dirs.items():
        config = load_hf_config(hf_dir)
        model = build_qwen3_model(config, params_dtype=torch.float32).eval()
        load_hf_weights(model, hf_dir)
        logp = megatron_logprobs(model, tokens, labels, VOCAB)
        exported = dict(export_hf_tensors(model, config))
        reference = load_file(f"{hf_dir}/model.safetensors")
        exported_equal = {n: torch.equal(t, reference[n]) for n, t in exported.items()}
        pad_rows = None
        if ps.is_pipeline_first_stage():
            emb = model.embedding.word_embeddings.weight  # [Vp/tp, H]
            start = ps.get_tensor_model_parallel_rank() * emb.shape[0]
            pad_rows = emb[max(VOCAB - start, 0) :].abs().sum().item()
        results[tied] = (logp, exported_equal, pad_rows)
    return results


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {tied: make_hf_model(root / f"tied{tied}", tied=tied) for tied in (False, True)}
    tokens, labels = make_batch()
    dirs = {tied: str(root / f"tied{tied}") for tied in models}
    return dirs, {tied: hf_logprobs(m, tokens, labels) for tied, m in models.items()}, models


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_logprobs_and_export_match_hf(hf_models, tp, pp):
    dirs, reference, models = hf_models
    per_rank = run_distributed(_parity_rank, world_size=tp * pp, layout=ParallelLayout(tp, pp), args=(dirs,))
    for tied in (False, True):
        hf_names = set(models[tied].state_dict()) - ({"lm_head.weight"} if tied else set())
        logps = [r[tied][0] for r in per_rank if r[tied][0] is not None]
        assert len(logps) == tp  # every TP rank of the last stage
        for logp in logps:
            torch.testing.assert_close(logp, reference[tied], atol=1e-4, rtol=0)
        exported = {}
        for r in per_rank:
            assert not exported.keys() & r[tied][1].keys(), "a tensor was exported by two ranks"
            exported |= r[tied][1]
        assert exported.keys() == hf_names
        assert all(exported.values()), [n for n, ok in exported.items() if not ok]
        assert all(r[tied][2] == 0 for r in per_rank if r[tied][2] is not None), "padded rows not zero"


QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
)
QWEN3_4B = {**QWEN3_8B, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True}


def _count_on_meta(configs):
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    counts = []
    for config in configs:
        with torch.device("meta"):
            # divisor 1: no vocabulary padding, so the count is comparable with HF's
            model = build_qwen3_model(config, init_weights=False, make_vocab_size_divisible_by=1)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts


def test_parameter_counts_of_qwen3_8b_and_4b_match_hf():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    expected = []
    for shape in (QWEN3_8B, QWEN3_4B):
        with torch.device("meta"):
            hf = Qwen3ForCausalLM(Qwen3Config(**shape))
        expected.append(sum(p.numel() for p in hf.parameters()))  # a tied weight counts once
    configs = [
        {**shape, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
        for shape in (QWEN3_8B, QWEN3_4B)
    ]
    (counts,) = run_distributed(_count_on_meta, world_size=1, args=(configs,))
    assert counts == expected
    assert expected[0] == 8_190_735_360  # Qwen3-8B's published size
