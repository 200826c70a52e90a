import random

import pytest

from srpo_megatron.data.rows import PromptRow
from srpo_megatron.data.templating import encode_prompt, render_prompt, tokenize_and_filter
from srpo_megatron.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir


def test_offline_qwen3_tokenizer(tokenizer):
    assert (qwen3_tokenizer_dir() / "tokenizer.json").is_file()
    assert len(tokenizer) == 151_669
    assert load_tokenizer() is tokenizer  # cached


def test_qwen3_template_thinking_off(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = render_prompt(tokenizer, messages)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = encode_prompt(tokenizer, messages)
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["<think>", "\n\n", "</think>", "\n\n"]


def test_length_filter_counts_drops(tokenizer):
    rng = random.Random(0)
    rows = [
        PromptRow(
            "sciknoweval", [{"role": "user", "content": " ".join(["word"] * rng.randrange(1, 60))}], "A"
        )
        for _ in range(30)
    ]
    lengths = [len(encode_prompt(tokenizer, r.messages)) for r in rows]
    kept, report = tokenize_and_filter(rows, tokenizer, max_prompt_length=40)
    assert report.kept == len(kept) == sum(n <= 40 for n in lengths)
    assert report.dropped == {"longer than 40 tokens": sum(n > 40 for n in lengths)}
    assert all(len(k.prompt_ids) <= 40 for k in kept)
    assert "dropped" in str(report)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_and_filter(rows, tokenizer, 0)
