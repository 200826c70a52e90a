"""The SRPO training loop (DESIGN.md, "The data path of one training step"):

    rollouts -> rewards -> routing -> old log-probs (+ the student's top-K ids)
      -> EMA-teacher forward on SDPO-routed rollouts only -> mini-batches through Megatron's schedule
      -> optimizer step -> EMA teacher update -> weight sync -> metrics

Every rank runs this loop. Rollouts are generated once (by the engine's owner rank) and broadcast,
so rewards, routing and advantages are the same numbers on every rank; each data-parallel rank
then scores and trains its own contiguous share of the step's rollouts (whole prompt groups).
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from srpo_megatron.algorithms import compute_group_advantages, compute_weight_stats, route_rollouts
from srpo_megatron.config import Config, to_dict, validate_layout
from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.rollout.weight_sync import WeightSync
from srpo_megatron.runtime.distributed import ParallelLayout, from_rank_0, init_distributed
from srpo_megatron.trainer.actor import MegatronActor, TrainInputs
from srpo_megatron.trainer.batching import build_micro_batches
from srpo_megatron.trainer.checkpoint import (
    checkpoint_root,
    export_hf,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from srpo_megatron.trainer.engines import start_engine
from srpo_megatron.trainer.evaluation import BestWithinBudget, evaluate, load_eval_prompts
from srpo_megatron.trainer.header import print_start_header
from srpo_megatron.trainer.metrics import MetricsLogger, PhaseTimer
from srpo_megatron.trainer.rollouts import StepRollouts, generate_rollouts, stop_token_ids
from srpo_megatron.trainer.run_dir import lock_run_dir, refuse_to_start_over, restore_metrics
from srpo_megatron.trainer.setup import load_run_inputs


@dataclass
class RunResult:
    metrics: dict[str, float]  # the last step's
    actor: MegatronActor
    engine: RolloutEngine | None  # the rollout engine on global rank 0, None elsewhere


@dataclass
class Run:
    """What lives for the whole run."""

    cfg: Config
    hf_config: dict
    tokenizer: object
    dataset: object
    actor: MegatronActor
    engine: RolloutEngine | None  # on global rank 0
    weight_sync: WeightSync
    logger: MetricsLogger
    routing_rng: torch.Generator
    eval_prompts: list
    best: BestWithinBudget = field(default_factory=BestWithinBudget)
    hours: float = 0.0  # training wall clock so far (for the eval budgets), kept across resumes


def train(cfg: Config) -> RunResult:
    _start_distributed(cfg)
    lock = engine = weight_sync = None
    try:
        lock, resume = _open_run_dir(cfg)
        hf_config, tokenizer, dataset = load_run_inputs(cfg)
        print_start_header(cfg, dataset, resume)
        engine, weight_sync = start_engine(cfg, tokenizer)
        return _train(_setup(cfg, hf_config, tokenizer, dataset, engine, weight_sync), resume)
    finally:
        try:
            if weight_sync is not None:  # disaggregated: the engines leave this run's groups
                weight_sync.close()
        finally:
            if engine is not None:  # SGLang: stop the servers this run launched
                engine.shutdown()
            if lock is not None:
                lock.close()


def _train(run: Run, resume: Path | None) -> RunResult:
    cfg = run.cfg
    start = _resume_if_any(run, resume)
    # The engine starts from the actor's weights: the same HF weights on a fresh start, the
    # checkpoint's on a resume.
    run.weight_sync.sync(run.actor.student, run.hf_config)
    metrics, rewards = {}, []
    for step in range(start + 1, cfg.train.total_steps + 1):
        metrics = train_step(run, step)
        run.hours += metrics["time/total"] / 3600
        last = step == cfg.train.total_steps
        if run.eval_prompts and (last or _every(step, cfg.eval.every)):
            metrics |= _evaluate(run, step)
        run.logger.log(step, metrics)
        run.logger.print_line(step, cfg.train.total_steps, metrics)
        rewards.append(metrics["reward_mean"])
        if last or _every(step, cfg.ckpt.save_every):
            extra = {"hours": run.hours, "best": run.best.state_dict()}
            save_checkpoint(cfg, step, run.actor, run.dataset, run.routing_rng, run.hf_config, extra)
    _finish(run, rewards)
    return RunResult(metrics, run.actor, run.engine)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One SRPO step (the diagram at the top of this file); returns its metrics."""
    from megatron.core import parallel_state

    cfg, actor = run.cfg, run.actor
    dp = parallel_state.get_data_parallel_world_size()
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    updates = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    timer = PhaseTimer()
    with timer("total"):
        rows = run.dataset.next_batch()
        with timer("rollout"):
            ro: StepRollouts = generate_rollouts(
                run.engine, cfg, run.tokenizer, rows, seed=cfg.train.seed + step
            )
        with timer("reward"):
            ro.score(rows, run.tokenizer, cfg.reward.tool_use_parser)
        routing = route_rollouts(ro.rewards, ro.group_ids, cfg.algorithm, generator=run.routing_rng)
        advantages = compute_group_advantages(ro.rewards, ro.group_ids, std_norm=cfg.algorithm.adv_std_norm)

        mine = _my_share(len(ro), dp, parallel_state.get_data_parallel_rank())
        with timer("old_logp"):
            old = ro.score_student(actor, mine, topk=cfg.algorithm.topk if cfg.algorithm.uses_teacher else 0)
        with timer("teacher"):
            needs = [i for i in mine if bool(routing.needs_teacher[i])]
            teacher = ro.score_teacher(actor, needs, routing, old, run.tokenizer, rows, cfg)
        with timer("train"):
            per_update = len(mine) // updates
            train_metrics = [
                _train_mini_batch(
                    actor,
                    cfg,
                    ro,
                    mine[k * per_update : (k + 1) * per_update],
                    routing,
                    advantages,
                    old,
                    teacher,
                    last_stage,
                )
                for k in range(updates)
            ]
        if any(m["update_ok"] for m in train_metrics):
            actor.update_teacher(cfg.algorithm.ema_decay)
        with timer("sync"):
            sync_metrics = run.weight_sync.sync(actor.student, run.hf_config)

    metrics = ro.metrics(routing, cfg.algorithm.variant, old, teacher) | _reduce_train_metrics(train_metrics)
    metrics |= sync_metrics
    return _from_last_stage(metrics) | timer.seconds


def _start_distributed(cfg: Config) -> None:
    # The layout keys are checked against the launcher's world before Megatron sees them.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    # Ranks wait in a collective while rank 0 starts the engines or generates: the groups' timeout
    # must outlast the engines' own deadlines, so that those are what reports a stuck engine.
    r = cfg.rollout
    timeout_minutes = max(30, math.ceil(max(r.call_timeout_s, r.startup_timeout_s) / 60) + 10)
    init_distributed(
        ParallelLayout(tp=cfg.model.tp, pp=cfg.model.pp), seed=cfg.train.seed, timeout_minutes=timeout_minutes
    )


def _open_run_dir(cfg: Config):
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


def _setup(cfg: Config, hf_config: dict, tokenizer, dataset, engine, weight_sync) -> Run:
    updates_per_step = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    return Run(
        cfg=cfg,
        hf_config=hf_config,
        tokenizer=tokenizer,
        dataset=dataset,
        actor=MegatronActor(cfg, hf_config, optimizer_steps=cfg.train.total_steps * updates_per_step),
        engine=engine,
        weight_sync=weight_sync,
        logger=MetricsLogger(
            cfg.output_dir,
            enabled=dist.get_rank() == 0,
            tensorboard=cfg.log.tensorboard,
            wandb_project=cfg.log.wandb_project,
            run_name=cfg.log.run_name,
            config=to_dict(cfg),  # the resolved config: files merged, overrides applied
        ),
        routing_rng=torch.Generator().manual_seed(cfg.train.seed),
        eval_prompts=load_eval_prompts(cfg, tokenizer) if cfg.eval.every >= 0 else [],
    )


def _resume_if_any(run: Run, path: Path | None) -> int:
    """The step to continue after (0 for a fresh run)."""
    if path is None:
        return 0
    step, extra = load_checkpoint(path, run.cfg, run.actor, run.dataset, run.routing_rng)
    run.hours = extra["hours"]
    run.best.load_state_dict(extra["best"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {step})")
        if step >= run.cfg.train.total_steps:
            print(
                f"the run is already complete (train.total_steps={run.cfg.train.total_steps}); to start "
                "over set another log.run_name, to go on raise train.total_steps"
            )
    return step


def _evaluate(run: Run, step: int) -> dict[str, float]:
    timer = PhaseTimer()
    with timer("eval"):
        metrics = evaluate(
            run.engine, run.cfg, run.tokenizer, run.eval_prompts, stop_token_ids(run.tokenizer), seed=step
        )
    key = f"eval/avg@{run.cfg.eval.n_samples}"
    return metrics | run.best.update(metrics[key], run.hours) | timer.seconds


def _finish(run: Run, rewards: list[float]) -> None:
    cfg = run.cfg
    run.logger.close()
    if dist.get_rank() != 0:
        return
    if rewards:
        k = min(10, len(rewards))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        print(f"reward_mean: first {k} steps {first:.3f}, last {k} steps {last:.3f} ({last - first:+.3f})")
    print(f"metrics: {cfg.output_dir / 'metrics.jsonl'}")
    if cfg.ckpt.export_hf:
        _, ckpt = list_checkpoints(checkpoint_root(cfg))[-1]
        export_hf(ckpt, cfg.output_dir / "hf", cfg.model.tokenizer_dir or cfg.model.hf_dir)


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _my_share(num_rollouts: int, dp: int, dp_rank: int) -> list[int]:
    """Rollout indices of this data-parallel rank: an equal contiguous slice of the step's rollouts
    (whole prompt groups, since validate_layout makes mini_batch_prompts divisible by dp). Optimizer
    step k trains on the k-th part of every rank's slice: mini_batch_prompts prompts in all."""
    per_rank = num_rollouts // dp
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


def _train_mini_batch(actor, cfg: Config, ro, ids, routing, advantages, old, teacher, last_stage) -> dict:
    micro_batches = build_micro_batches(
        [ro.prompt_ids[i] for i in ids],
        [ro.response_ids[i] for i in ids],
        pad_id=ro.pad_id,
        token_budget=cfg.train.micro_batch_tokens,
    )
    inputs, weight_sum, weight_count = None, None, None
    if last_stage:
        inputs = [ro.train_inputs(mb, ids, routing, advantages, old, teacher) for mb in micro_batches]
        if cfg.algorithm.uses_dynamic_weighting:
            weight_sum, weight_count = _global_weight_stats(inputs, micro_batches, cfg.algorithm.entropy_beta)
    return actor.train(micro_batches, inputs, weight_sum=weight_sum, weight_count=weight_count)


def _global_weight_stats(inputs: list[TrainInputs], micro_batches, beta: float):
    """sum and count of exp(-beta H) over every SDPO token of the mini-batch, all data-parallel ranks."""
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for x, mb in zip(inputs, micro_batches, strict=True):
        if x.teacher_entropy is None:
            continue
        mask = mb.response_mask & x.route_sdpo[:, None]
        s, c = compute_weight_stats(x.teacher_entropy, mask, beta)
        total += torch.stack([s.double(), c.double()])
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total[0], total[1]


# The tokens each per-micro-batch statistic is a mean over, by key prefix.
_TOKENS_OF = {
    "route/": lambda m: m["valid_tokens"],
    "is/": lambda m: m["valid_tokens"],
    "grpo/": lambda m: round(m["route/grpo_token_frac"] * m["valid_tokens"]),
    "sdpo/": lambda m: round(m["route/sdpo_token_frac"] * m["valid_tokens"]),
    "dw/": lambda m: round(m["route/sdpo_token_frac"] * m["valid_tokens"]),
}


def _reduce_train_metrics(per_update: list[dict]) -> dict[str, float]:
    """One number per key over the step's optimizer updates, their micro-batches and every
    data-parallel rank (collective over data parallel on the last pipeline stage).

    Loss terms are numerators: summed, then divided by the step's global token count. Statistics
    are token-weighted means over their branch's tokens (0 where a branch has none); weight min /
    max are the extremes over the tokens that have a weight.
    """
    from megatron.core import parallel_state

    out: dict[str, float] = {}
    for key in ("grad_norm", "lr", "update_ok"):  # the same on every rank
        values = [u[key] for u in per_update if math.isfinite(u[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    out["skipped_updates"] = sum(u["skipped_update"] for u in per_update)
    micro = [m for update in per_update for m in update["micro_batches"]]
    if not micro:  # not the last pipeline stage
        return out
    means = [k for k in micro[0] if k.startswith(tuple(_TOKENS_OF)) and not k.endswith(("_min", "_max"))]
    extremes = [k for k in micro[0] if k.endswith(("_min", "_max"))]
    sums = torch.zeros(3 + 2 * len(means), dtype=torch.float64)  # loss numerators, token count, ...
    for m in micro:
        sums[0] += m["loss/grpo"]
        sums[1] += m["loss/sdpo"]
        sums[2] += m["num_tokens"]
        for j, key in enumerate(means):
            tokens = next(weigh(m) for prefix, weigh in _TOKENS_OF.items() if key.startswith(prefix))
            sums[3 + 2 * j] += m[key] * tokens
            sums[4 + 2 * j] += tokens
    # an extreme over no token is +-inf here and 0 in the log, as the loss's own metrics have it
    lows = torch.full((len(extremes),), math.inf, dtype=torch.float64)
    highs = torch.full((len(extremes),), -math.inf, dtype=torch.float64)
    for m in micro:
        if _TOKENS_OF["dw/"](m) == 0:
            continue  # dw/weight_* are over SDPO tokens
        for j, key in enumerate(extremes):
            lows[j] = min(lows[j], m[key])
            highs[j] = max(highs[j], m[key])
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(sums, group=group)
    dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=group)

    tokens = max(float(sums[2]), 1.0)
    out["loss/grpo"] = float(sums[0]) / tokens
    out["loss/sdpo"] = float(sums[1]) / tokens
    out["loss"] = out["loss/grpo"] + out["loss/sdpo"]
    for j, key in enumerate(means):
        weight = float(sums[4 + 2 * j])
        out[key] = float(sums[3 + 2 * j]) / weight if weight > 0 else 0.0
    for j, key in enumerate(extremes):
        value = float(lows[j] if key.endswith("_min") else highs[j])
        out[key] = value if math.isfinite(value) else 0.0
    return out


def _from_last_stage(metrics: dict) -> dict:
    """Loss metrics live on the last pipeline stage; the logging rank (global 0) takes them from there."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    box = [metrics]
    dist.broadcast_object_list(box, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]
