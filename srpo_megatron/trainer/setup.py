"""What a run loads before its first step, each checked at start with a UserError that names the
key or the file and row: the model's config.json against the layout, the tokenizer, the training
prompts (every row's data_source has a reward function)."""

from pathlib import Path

import torch.distributed as dist

from srpo_megatron.config import Config, check_recompute_layers
from srpo_megatron.data.dataset import PromptDataset
from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import tokenize_and_filter
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.rewards.registry import get_reward_fn


def load_model_config(cfg: Config) -> dict:
    """``model.hf_dir``'s config.json, a Qwen3 that splits by ``model.tp`` and ``model.pp``."""
    try:
        hf_config = load_hf_config(cfg.model.hf_dir)
        arch = Qwen3Arch.from_hf(hf_config)
    except ValueError as err:
        raise UserError(f"config: model.hf_dir={cfg.model.hf_dir}: {err}") from None
    try:
        arch.check_layout(cfg.model.tp, cfg.model.pp)
    except ValueError as err:
        raise UserError(
            f"config: model.tp={cfg.model.tp} / model.pp={cfg.model.pp} do not fit model.hf_dir="
            f"{cfg.model.hf_dir}: {err}"
        ) from None
    check_recompute_layers(cfg.model, arch.num_layers)
    return hf_config


def has_reward_fn(row) -> None:
    """A check for ``load_rows``: the registry's ValueError for a data_source without a verifier."""
    get_reward_fn(row.data_source)


def load_run_inputs(cfg: Config):
    """(hf_config, tokenizer, PromptDataset), identical on every rank (same files, same seed)."""
    hf_config = load_model_config(cfg)
    key = "model.tokenizer_dir" if cfg.model.tokenizer_dir else "model.hf_dir"
    path = Path(cfg.model.tokenizer_dir or cfg.model.hf_dir)
    if not path.is_dir():  # transformers would take the name for a hub repository
        raise UserError(f"config: {key}={path}: no such directory")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"config: {key}={path}: no tokenizer loads from it ({reason})") from None
    # transformers builds a one-token tokenizer from a config.json alone, without a word
    if tokenizer.chat_template is None:
        raise UserError(f"config: {key}={path}: no tokenizer with a chat template (tokenizer_config.json)")
    if len(tokenizer) > hf_config["vocab_size"]:
        raise UserError(
            f"config: {key}={path}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size {hf_config['vocab_size']}"
        )
    rows = [row for file in cfg.data.train_files for row in load_rows(file, check=has_reward_fn)]
    prompts, report = tokenize_and_filter(rows, tokenizer, cfg.data.max_prompt_length)
    if len(prompts) < cfg.train.prompts_per_step:
        raise UserError(
            f"config: train.prompts_per_step={cfg.train.prompts_per_step}, but data.train_files hold "
            f"{len(prompts)} usable prompts ({report})"
        )
    if dist.get_rank() == 0:
        print(f"data: {len(rows)} rows from {len(cfg.data.train_files)} file(s); {report}")
    dataset = PromptDataset(prompts, batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed)
    return hf_config, tokenizer, dataset
