"""The lines a training run starts with (global rank 0 only), so that its plan is on screen before
the slow parts begin: where the config came from, the layout and the engines, the model and its
size, the rewards, where it writes and where it starts from. ``engine_plan`` is the dry run's too.
"""

import json
import os
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.mapping import count_megatron_params
from srpo_megatron.models.vocab import padded_vocab_size
from srpo_megatron.rewards.registry import get_reward_fn
from srpo_megatron.trainer.checkpoint import TRAINER_STATE, checkpoint_root


def config_line(paths: list[str], overrides: list[str]) -> str:
    return f"config: {', '.join(map(str, paths)) or '(defaults)'}; overrides: {' '.join(overrides) or 'none'}"


def engine_plan(cfg: Config, local_world_size: int, on_gpus: bool) -> str:
    """on_gpus: where the engines will run (the dry run plans for GPUs wherever it runs)."""
    r = cfg.rollout
    if r.engine == "hf":
        return "the HF engine on global rank 0 (CPU / debugging)"
    engines = f"{r.num_engines} SGLang engine(s) x TP {r.engine_tp}"
    if r.mode == "colocated":
        weights = "weights by CUDA IPC" if on_gpus else "weights in shared memory"
    else:
        weights = f"weights by {'NCCL' if on_gpus else 'gloo'} broadcast"
    if r.engine_urls:
        return f"{engines} at {', '.join(r.engine_urls)} ({r.mode}), {weights}{_async(cfg)}"
    if not on_gpus:
        return f"{engines}, launched {r.mode} on rank 0's node, on its CPU, {weights}{_async(cfg)}"
    first = 0 if r.mode == "colocated" else local_world_size
    where = f"GPUs {first}-{first + r.num_engines * r.engine_tp - 1} of rank 0's node"
    memory = ", memory released while the actor trains" if r.mode == "colocated" else ""
    return f"{engines}, launched {r.mode} on {where}{memory}, {weights}{_async(cfg)}"


def _async(cfg: Config) -> str:
    return (
        "; async: each step's rollouts generated during the step before" if cfg.train.async_rollouts else ""
    )


def print_start_header(cfg: Config, hf_config: dict, dataset, resume: Path | None) -> None:
    """Collective-free; prints on global rank 0 only. ``resume``: the checkpoint the run continues from."""
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        print(start_header(cfg, hf_config, dataset, resume, world, local_world), flush=True)


def start_header(
    cfg: Config, hf_config: dict, dataset, resume: Path | None, world_size: int, local_world_size: int
) -> str:
    """The header after the config line (train.py) and the data line (trainer/setup.py)."""
    m = cfg.model
    arch = Qwen3Arch.from_hf(hf_config)
    padded = padded_vocab_size(arch.vocab_size, m.tp, m.make_vocab_size_divisible_by)
    sources = Counter(p.row.data_source for p in dataset.prompts)
    rewards = "; ".join(
        f"{source} ({count} prompts) -> {_reward_name(source, cfg.reward.tool_use_parser)}"
        for source, count in sorted(sources.items())
    )
    t = cfg.train
    expert_parallel = (
        f" (ep {m.ep}: every {m.ep} dp ranks share one copy of the experts)" if arch.is_moe else ""
    )
    return "\n".join(
        (
            f"layout: world {world_size} = tp {m.tp} x pp {m.pp} x dp {world_size // (m.tp * m.pp)}"
            f"{expert_parallel}; "
            f"rollouts: {engine_plan(cfg, local_world_size, torch.cuda.is_available())}",
            f"model: {m.hf_dir}, {count_megatron_params(arch, padded):,} parameters (vocabulary "
            f"{arch.vocab_size:,} padded to {padded:,} for tp {m.tp}), {m.dtype}; an EMA teacher alike",
            f"rewards: {rewards}; tool-use parser: {cfg.reward.tool_use_parser}",
            f"run: {cfg.algorithm.variant}, {t.total_steps} steps x {t.prompts_per_step} prompts x "
            f"{cfg.rollout.n} rollouts; output: {cfg.output_dir}; start: {_start_point(cfg, resume)}",
        )
    )


def _reward_name(source: str, tool_use_parser: str) -> str:
    reward_fn = get_reward_fn(source, tool_use_parser=tool_use_parser)
    return getattr(reward_fn, "func", reward_fn).__name__  # a partial for tool use


def _start_point(cfg: Config, resume: Path | None) -> str:
    if resume is not None:
        step = json.loads((resume / TRAINER_STATE).read_text())["step"]
        return f"resumes after step {step} from {resume}"
    if cfg.ckpt.resume == "none":
        return "fresh (ckpt.resume=none)"
    return f"fresh (no checkpoint in {checkpoint_root(cfg)})"
