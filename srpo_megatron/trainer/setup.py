"""What a run loads before its first step: the tokenizer and the training prompts."""

import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.data.dataset import PromptDataset
from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import tokenize_and_filter
from srpo_megatron.data.tokenizer import load_tokenizer


def load_training_data(cfg: Config):
    """(tokenizer, PromptDataset) — identical on every rank (same files, same seed)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer_dir or cfg.model.hf_dir)
    rows = [row for path in cfg.data.train_files for row in load_rows(path)]
    prompts, report = tokenize_and_filter(rows, tokenizer, cfg.data.max_prompt_length)
    if dist.get_rank() == 0:
        print(f"data: {len(rows)} rows from {len(cfg.data.train_files)} file(s); {report}")
    return tokenizer, PromptDataset(prompts, batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed)
