"""A run's start, in order (``loop.train``): the distributed world (``start_distributed``), the
run directory and the checkpoint to resume from (``open_run_dir``), what the run loads
(``load_run_inputs``: each checked at start with a UserError that names the key or the file and
row: the model's config.json against the layout, the tokenizer, the training prompts, every row's
data_source with a reward function), the rollout engines and their weight sync
(``engines.start_engine``), the actor and the rest of the ``Run`` (``build_run``), then the
checkpoint's state (``resume_if_any``)."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from srpo_megatron.config import Config, check_recompute_layers, to_dict, validate_layout
from srpo_megatron.data.dataset import PromptDataset
from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import tokenize_and_filter
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.rewards.registry import check_reward_fn
from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.rollout.weight_sync import WeightSync
from srpo_megatron.runtime.distributed import ParallelLayout, from_rank_0, init_distributed
from srpo_megatron.trainer.actor import MegatronActor
from srpo_megatron.trainer.checkpoint import Checkpointer, RngState, checkpoint_root, find_resume_checkpoint
from srpo_megatron.trainer.evaluation import BestWithinBudget, RunClock, load_eval_prompts
from srpo_megatron.trainer.metrics import MetricsLogger
from srpo_megatron.trainer.rollout_source import RolloutSource
from srpo_megatron.trainer.run_dir import lock_run_dir, refuse_to_start_over, restore_metrics


def load_model_config(cfg: Config) -> dict:
    """``model.hf_dir``'s config.json, a Qwen3 that splits by ``model.tp`` and ``model.pp``."""
    try:
        hf_config = load_hf_config(cfg.model.hf_dir)
        arch = Qwen3Arch.from_hf(hf_config)
    except ValueError as err:
        raise UserError(f"config: model.hf_dir={cfg.model.hf_dir}: {err}") from None
    try:
        arch.check_layout(cfg.model.tp, cfg.model.pp, cfg.model.ep)
    except ValueError as err:
        layout = f"model.tp={cfg.model.tp} / model.pp={cfg.model.pp}"
        layout += f" / model.ep={cfg.model.ep}" if cfg.model.ep > 1 else ""
        raise UserError(f"config: {layout} do not fit model.hf_dir={cfg.model.hf_dir}: {err}") from None
    if arch.is_moe and cfg.model.tp > 1 and not cfg.model.sequence_parallel:
        raise UserError(
            "config: a mixture-of-experts model at model.tp > 1 needs model.sequence_parallel=true "
            "(Megatron's MoE layer trains only so)"
        )
    if arch.is_moe and arch.tie_word_embeddings and cfg.rollout.engine == "sglang":
        raise UserError(
            f"config: model.hf_dir={cfg.model.hf_dir} is a Qwen3-MoE with tied embeddings, which SGLang "
            "0.5.23 cannot serve: its Qwen3MoeForCausalLM never ties lm_head (srt/models/qwen3_moe.py) "
            "and leaves it unloaded. Untie it (write lm_head.weight) or use rollout.engine=hf"
        )
    if cfg.algorithm.routing_replay != "none" and not arch.is_moe:
        raise UserError(
            f"config: algorithm.routing_replay={cfg.algorithm.routing_replay} replays a mixture-of-experts "
            f"router; model.hf_dir={cfg.model.hf_dir} is a dense {arch.model_type}"
        )
    check_recompute_layers(cfg.model, arch.num_layers)
    return hf_config


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
    rows = [row for file in cfg.data.train_files for row in load_rows(file, check=check_reward_fn)]
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


@dataclass
class Run:
    """What lives for the whole run."""

    cfg: Config
    hf_config: dict
    tokenizer: object
    dataset: object
    actor: MegatronActor
    engine: RolloutEngine | None  # on global rank 0, None elsewhere
    weight_sync: WeightSync
    rollouts: RolloutSource  # each step's rollouts (synchronous, or one step ahead), and the weight sync
    logger: MetricsLogger
    rng: RngState
    eval_prompts: list
    clock: RunClock  # training wall clock so far (for the eval budgets)
    best: BestWithinBudget
    checkpointer: Checkpointer  # saves and loads the parts above


def start_distributed(cfg: Config) -> None:
    # The layout keys are checked against the launcher's world before Megatron sees them.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    # Ranks wait in a collective while rank 0 starts the engines or generates: the groups' timeout
    # must outlast the engines' own deadlines, so that those are what reports a stuck engine.
    r = cfg.rollout
    timeout_minutes = max(30, math.ceil(max(r.call_timeout_s, r.startup_timeout_s) / 60) + 10)
    init_distributed(
        ParallelLayout(tp=cfg.model.tp, pp=cfg.model.pp, ep=cfg.model.ep),
        seed=cfg.train.seed,
        timeout_minutes=timeout_minutes,
    )


def open_run_dir(cfg: Config):
    """Rank 0 locks the run directory (run_dir.py) and picks the checkpoint to resume from
    (verified, checkpoint.py), resetting metrics.jsonl to it, before anything is loaded: a second
    trainer, or a bad ``ckpt.resume``, stops every rank at once. Returns (the open lock file on
    rank 0, None elsewhere; the checkpoint or None, on every rank)."""
    lock = None

    def claim() -> Path | None:
        nonlocal lock
        lock = lock_run_dir(cfg.output_dir)
        if cfg.ckpt.resume == "none":
            refuse_to_start_over(cfg.output_dir, checkpoint_root(cfg))
        path = find_resume_checkpoint(cfg)
        restore_metrics(cfg.output_dir, path)
        return path

    try:
        path = from_rank_0(claim, "opening the run directory")
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock, path


def build_run(cfg: Config, hf_config: dict, tokenizer, dataset, engine, weight_sync) -> Run:
    updates_per_step = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    actor = MegatronActor(cfg, hf_config, optimizer_steps=cfg.train.total_steps * updates_per_step)
    rollouts = RolloutSource(cfg, tokenizer, dataset, engine, weight_sync)
    rng, clock, best = RngState(cfg.train.seed), RunClock(), BestWithinBudget()
    return Run(
        cfg=cfg,
        hf_config=hf_config,
        tokenizer=tokenizer,
        dataset=dataset,
        actor=actor,
        engine=engine,
        weight_sync=weight_sync,
        rollouts=rollouts,
        logger=MetricsLogger(
            cfg.output_dir,
            enabled=dist.get_rank() == 0,
            tensorboard=cfg.log.tensorboard,
            wandb_project=cfg.log.wandb_project,
            run_name=cfg.log.run_name,
            config=to_dict(cfg),  # the resolved config: files merged, overrides applied
        ),
        rng=rng,
        eval_prompts=load_eval_prompts(cfg, tokenizer) if cfg.eval.every >= 0 else [],
        clock=clock,
        best=best,
        checkpointer=Checkpointer(
            cfg,
            hf_config,
            actor,
            rng=rng,
            rollouts=rollouts,
            shared={"data": dataset, "clock": clock, "best": best},
        ),
    )


def resume_if_any(run: Run, path: Path | None) -> int:
    """The step to continue after (0 for a fresh run)."""
    if path is None:
        return 0
    step = run.checkpointer.load(path)
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {step})")
        if step >= run.cfg.train.total_steps:
            print(
                f"the run is already complete (train.total_steps={run.cfg.train.total_steps}); to start "
                "over set another log.run_name, to go on raise train.total_steps"
            )
    return step
