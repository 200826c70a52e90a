"""The SRPO training loop (DESIGN.md, "The data path of one training step"):

    rollouts -> rewards -> routing, advantages -> this rank's step batch on its device
      -> old log-probs (+ the student's top-K ids) -> EMA-teacher pass on the SDPO-routed rollouts
      -> per optimizer update: micro-batches through Megatron's schedule, optimizer step
      -> EMA teacher update -> weight sync -> metrics (reduced once)

Every rank runs this loop. Rollouts are generated once (by the engine's owner rank) and broadcast,
so rewards, routing and advantages are the same numbers on every rank; each data-parallel rank
then runs the actor passes and trains on its own contiguous share of the step's rollouts (whole
prompt groups), held token-major on its device (``step_batch.py``): the passes fill its columns,
micro-batches are slices of it, and the step's metrics stay on the device until one all-reduce
per kind at the end. The functions of each stage are in ``rollouts.py``, where a step's rollouts come
from (synchronous, or generated during the step before: ``train.async_rollouts``) in
``rollout_source.py``; the run's start is in ``setup.py``.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from srpo_megatron.algorithms import compute_group_advantages, route_rollouts
from srpo_megatron.config import Config
from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.runtime.distributed import get_device
from srpo_megatron.trainer.actor import MegatronActor
from srpo_megatron.trainer.checkpoint import checkpoint_root, export_hf, list_checkpoints
from srpo_megatron.trainer.engines import start_engine
from srpo_megatron.trainer.evaluation import evaluate, summarize_eval
from srpo_megatron.trainer.header import print_start_header
from srpo_megatron.trainer.metrics import MetricSums, PhaseTimer, from_last_stage, reduce_train_metrics
from srpo_megatron.trainer.rollouts import (
    build_step_batch,
    compute_old_logp,
    compute_rewards,
    compute_teacher_stats,
    reduce_weight_stats,
    rollout_metrics,
    step_stats,
    stop_token_ids,
    teacher_prefixes,
)
from srpo_megatron.trainer.setup import (
    Run,
    build_run,
    load_run_inputs,
    open_run_dir,
    resume_if_any,
    start_distributed,
)


@dataclass
class RunResult:
    metrics: dict[str, float]  # the last step's
    actor: MegatronActor
    engine: RolloutEngine | None  # the rollout engine on global rank 0, None elsewhere


def train(cfg: Config) -> RunResult:
    start_distributed(cfg)
    lock = engine = weight_sync = None
    try:
        lock, resume = open_run_dir(cfg)
        hf_config, tokenizer, dataset = load_run_inputs(cfg)
        print_start_header(cfg, hf_config, dataset, resume)
        engine, weight_sync = start_engine(cfg, tokenizer)
        return _train(build_run(cfg, hf_config, tokenizer, dataset, engine, weight_sync), resume)
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
    start = resume_if_any(run, resume)
    # The engine starts from the actor's weights: the same HF weights on a fresh start, the
    # checkpoint's on a resume.
    run.rollouts.push_weights(run.actor.student, run.hf_config, version=start)
    metrics, rewards, evaluation = {}, [], {}
    for step in range(start + 1, cfg.train.total_steps + 1):
        metrics = train_step(run, step)
        run.clock.add(metrics["time/total"])
        last = step == cfg.train.total_steps
        evaluation = {}
        if run.eval_prompts and (last or _every(step, cfg.eval.every)):
            evaluation = _evaluate(run, step)
        metrics |= evaluation
        run.logger.log(step, metrics)
        run.logger.print_line(step, cfg.train.total_steps, metrics)
        if evaluation and dist.get_rank() == 0:
            print(f"eval after step {step}: {summarize_eval(evaluation, cfg.eval.n_samples)}")
        rewards.append(metrics["reward_mean"])
        if last or _every(step, cfg.ckpt.save_every):
            run.checkpointer.save(step)
    _finish(run, rewards, evaluation)
    return RunResult(metrics, run.actor, run.engine)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One SRPO step (the diagram at the top of this file); returns its metrics."""
    from megatron.core import parallel_state

    cfg, actor, alg = run.cfg, run.actor, run.cfg.algorithm
    dp_group = parallel_state.get_data_parallel_group()
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    timer = PhaseTimer()
    with timer("total"):
        with timer("rollout"):  # async: the batch generated during the last step, the next submitted
            rows, batch, version_metrics = run.rollouts.take(step)
        with timer("reward"):
            rewards, parsed = compute_rewards(batch, rows, run.tokenizer, cfg.reward.tool_use_parser)
        group_ids = torch.tensor(batch.prompt_index, dtype=torch.long)
        routing = route_rollouts(rewards, group_ids, alg, generator=run.rng.routing)
        advantages = compute_group_advantages(rewards, group_ids, std_norm=alg.adv_std_norm)

        mine = _my_share(len(batch), dist.get_world_size(dp_group), dist.get_rank(dp_group))
        with timer("batch"):  # this rank's share, token-major, on its device
            needs = [i for i in mine if bool(routing.needs_teacher[i])]
            prefixes = teacher_prefixes(
                batch, needs, routing.sibling, run.tokenizer, rows, alg.teacher_max_prompt_len
            )
            step_batch = build_step_batch(
                batch,
                mine,
                routing,
                advantages,
                alg,
                dict(zip(needs, prefixes, strict=True)),
                pad_id=run.tokenizer.pad_token_id or 0,
                device=get_device(),
                route_shape=actor.route_shape,
            )
        with timer("old_logp"):
            route_metrics = compute_old_logp(actor, step_batch, alg.routing_replay)
        with timer("teacher"):
            compute_teacher_stats(actor, step_batch)
        sums = MetricSums()  # the step's metrics of its passes, on the device (last stage)
        with timer("train"):
            updates = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
            per_update = len(mine) // updates
            train_updates = []
            for k in range(updates):
                first, last = k * per_update, (k + 1) * per_update
                mbs = actor.micro_batches(step_batch.student, first, last)
                inputs = weights = None
                if last_stage:
                    inputs = [step_batch.loss_batch(mb.span) for mb in mbs]
                    if alg.uses_dynamic_weighting:
                        span = step_batch.student.span(first, last)
                        weights = reduce_weight_stats(step_batch, span, alg.entropy_beta, dp_group)
                replay = alg.routing_replay != "none" and actor.route_shape is not None
                update = actor.train(mbs, inputs, weight_stats=weights, replay_routes=replay)
                for metrics in update.metrics:
                    sums.add(metrics)
                train_updates.append(update)
        if any(u.ok for u in train_updates):
            actor.update_teacher(alg.ema_decay)
        # async: waits for the next step's batch first (time/rollout_wait)
        sync_metrics = run.rollouts.push_weights(actor.student, run.hf_config, version=step, timer=timer)

    if last_stage:
        sums.add(step_stats(step_batch) | route_metrics)
    metrics = rollout_metrics(batch, rewards, parsed, routing, alg.variant) | version_metrics
    metrics |= reduce_train_metrics(train_updates, sums, dp_group) | sync_metrics
    return from_last_stage(metrics) | timer.seconds


def _my_share(num_rollouts: int, dp: int, dp_rank: int) -> list[int]:
    """Rollout indices of this data-parallel rank: an equal contiguous slice of the step's rollouts
    (whole prompt groups, since validate_layout makes mini_batch_prompts divisible by dp). Optimizer
    update k trains on the k-th part of every rank's slice: mini_batch_prompts prompts in all."""
    per_rank = num_rollouts // dp
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


def _evaluate(run: Run, step: int) -> dict[str, float]:
    timer = PhaseTimer()
    with timer("eval"):
        metrics = evaluate(
            run.engine, run.cfg, run.tokenizer, run.eval_prompts, stop_token_ids(run.tokenizer), seed=step
        )
    key = f"eval/avg@{run.cfg.eval.n_samples}"
    return metrics | run.best.update(metrics[key], run.clock.hours) | timer.seconds


def _finish(run: Run, rewards: list[float], evaluation: dict[str, float]) -> None:
    """The run's last lines (rank 0): the reward's trend, the last step's evaluation (none if that
    step had no evaluation), where the metrics are; then the HF export."""
    cfg = run.cfg
    run.logger.close()
    if dist.get_rank() != 0:
        return
    if rewards:
        k = min(10, len(rewards))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        print(f"reward_mean: first {k} steps {first:.3f}, last {k} steps {last:.3f} ({last - first:+.3f})")
    if evaluation:
        print(f"final eval: {summarize_eval(evaluation, cfg.eval.n_samples)}")
    print(f"metrics: {cfg.output_dir / 'metrics.jsonl'}")
    if cfg.ckpt.export_hf:
        _, ckpt = list_checkpoints(checkpoint_root(cfg))[-1]
        export_hf(ckpt, cfg.output_dir / "hf", cfg.model.tokenizer_dir or cfg.model.hf_dir)


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
