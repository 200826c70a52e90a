"""The format warm-up and tools/make_tiny_model.py, which makes the tiny starting checkpoint with it."""

import pytest
import torch

from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.format_warmup import WarmupConfig, answer_ids, evaluate_format, format_warmup
from srpo_megatron.models.qwen3.tiny import TinyQwen3Config, build_tiny_qwen3
from tools.make_tiny_model import main as make_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_answer_target_tokens(tokenizer):
    ids = answer_ids(tokenizer, "C")
    assert tokenizer.decode(ids) == "<answer>C</answer><|im_end|>"
    assert len(ids) == 7


def test_tiny_model_shape(tokenizer):
    model = build_tiny_qwen3(tokenizer, seed=0)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (2, 128, 32)
    assert config.vocab_size == TinyQwen3Config().vocab_size >= len(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32


def _warm(tokenizer, seed):
    model = build_tiny_qwen3(tokenizer, seed)
    losses = format_warmup(model, tokenizer, WarmupConfig(steps=2, batch_size=2, lr=1e-3, seed=seed))
    return model.state_dict(), losses


def test_warmup_is_deterministic_by_seed(tokenizer):
    weights_a, losses_a = _warm(tokenizer, 0)
    weights_b, losses_b = _warm(tokenizer, 0)
    assert losses_a == losses_b and losses_a[1] < losses_a[0]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # Another seed starts from other weights (and draws other prompts and letters).
    other = build_tiny_qwen3(tokenizer, seed=1).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights_a[key], other[key])


def test_evaluate_format_counts(tokenizer):
    result = evaluate_format(build_tiny_qwen3(tokenizer, 0), tokenizer, num_prompts=4, temperature=1.0)
    assert result["num_prompts"] == 4
    assert result["format_rate"] == 0.0  # a random model does not write the format


def test_cli_saves_an_hf_folder(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    make_tiny_model(["--out-dir", str(out), "--steps", "1", "--batch-size", "2", "--eval-prompts", "0"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)
    assert (out / "warmup.json").is_file()
