"""Prompt data: loading and validating rows, chat templating, length filtering, the resumable
shuffled batch order, and the synthetic CPU task (its format warm-up is ``srpo_megatron/format_warmup.py``)."""

from srpo_megatron.data.dataset import PromptDataset
from srpo_megatron.data.rows import PromptRow, load_rows, parse_row, save_rows
from srpo_megatron.data.synthetic import make_synthetic_rows
from srpo_megatron.data.templating import (
    FilterReport,
    TokenizedPrompt,
    encode_prompt,
    render_prompt,
    tokenize_and_filter,
)
from srpo_megatron.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir

__all__ = [
    "FilterReport",
    "PromptDataset",
    "PromptRow",
    "TokenizedPrompt",
    "encode_prompt",
    "load_rows",
    "load_tokenizer",
    "make_synthetic_rows",
    "parse_row",
    "qwen3_tokenizer_dir",
    "render_prompt",
    "save_rows",
    "tokenize_and_filter",
]
