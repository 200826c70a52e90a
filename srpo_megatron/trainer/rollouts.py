"""One step's rollouts (a ``RolloutBatch``, the same on every rank) and what the step computes from
them, one free function each ("pass": a forward pass of the actor; "DP": a collective over the
data-parallel group, passed in):

    generate_rollouts       rank 0 samples, every rank receives the batch           broadcast
    sample_rollouts         rank 0's part of it (async_rollouts.py runs it on a thread)
    compute_rewards         each prompt's verifier on each response -> [R] rewards, parsed
    teacher_prefixes        the teacher prompts (with a correct sibling's solution)
    build_step_batch        this rank's share as a ``StepBatch`` on its device (step_batch.py)
    compute_old_logp        the student's log-probs (+ top-K ids, a MoE student's routes) into
                            the step batch                                                pass
    compute_teacher_stats   the EMA teacher at the student's tokens and top-K ids, likewise    pass
    rollout_metrics         the step's rollout statistics (no communication)
    step_stats              the actor-engine log-prob gap and the teacher's entropy, typed
    reduce_weight_stats     the dynamic weights' global sum and count                     DP

Rollouts are indexed by their place in the step. The passes fill the step batch's columns on the
last pipeline stage (where the output layer is); elsewhere they stay 0 and nothing reads them.
"""

import torch
import torch.distributed as dist

from srpo_megatron.algorithms import AlgorithmConfig, Routing, compute_weight_stats
from srpo_megatron.algorithms.stats import Max, Mean, Metric
from srpo_megatron.config import Config
from srpo_megatron.data.teacher_prompt import build_teacher_input_ids
from srpo_megatron.rewards.registry import get_reward_fn
from srpo_megatron.rollout.engine import RolloutBatch, SamplingParams
from srpo_megatron.runtime.distributed import from_rank_0
from srpo_megatron.trainer.actor import MegatronActor
from srpo_megatron.trainer.expert_routes import RoutePass
from srpo_megatron.trainer.step_batch import Sequences, StepBatch


def generate_rollouts(engine, cfg: Config, tokenizer, rows, *, seed: int) -> RolloutBatch:
    """Rank 0 samples ``rollout.n`` responses per prompt (``sample_rollouts``); every rank receives
    the same batch."""
    return from_rank_0(lambda: sample_rollouts(engine, cfg, tokenizer, rows, seed=seed), "rollout generation")


def sample_rollouts(engine, cfg: Config, tokenizer, rows, *, seed: int) -> RolloutBatch:
    """Rank 0 only: ``rollout.n`` responses per prompt of ``rows`` from ``engine``. Colocated engines
    then give their GPU memory back for training (before the batch goes out, so that no rank starts
    its forward passes while the engines still hold it)."""
    params = SamplingParams(
        n=cfg.rollout.n,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids(tokenizer)),
        seed=seed,
        record_routes=cfg.algorithm.routing_replay == "rollout",
    )
    batch = engine.generate([row.prompt_ids for row in rows], params)
    engine.release_memory()
    return batch


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def compute_rewards(
    batch: RolloutBatch, rows, tokenizer, tool_use_parser: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R] rewards from each prompt's verifier (``reward.tool_use_parser`` for tool use), and [R]
    whether it could read an answer (the format rate); a verifier never raises on the response text."""
    results = []
    for prompt, response in zip(batch.prompt_index, batch.response_ids, strict=True):
        row = rows[prompt].row
        text = tokenizer.decode(response, skip_special_tokens=True)
        reward_fn = get_reward_fn(row.data_source, tool_use_parser=tool_use_parser)
        results.append(reward_fn(text, row.ground_truth))
    rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
    return rewards, torch.tensor([r.parsed for r in results], dtype=torch.bool)


def teacher_prefixes(
    batch: RolloutBatch, ids: list[int], sibling: torch.Tensor, tokenizer, rows, max_prompt_len: int
) -> list[list[int]]:
    """The teacher prompt of each rollout in ``ids`` (the prompt with its correct sibling's solution,
    ALGORITHM.md sec. 2), as token ids."""
    prefixes = []
    for i in ids:
        teacher_ids, prompt_len = build_teacher_input_ids(
            tokenizer,
            rows[batch.prompt_index[i]].row.messages,
            batch.response_ids[int(sibling[i])],
            batch.response_ids[i],
            max_prompt_len,
        )
        prefixes.append(teacher_ids[:prompt_len])
    return prefixes


def build_step_batch(
    batch: RolloutBatch,
    ids: list[int],
    routing: Routing,
    advantages: torch.Tensor,
    alg: AlgorithmConfig,
    teacher_prefix_of: dict[int, list[int]],
    *,
    pad_id: int,
    device: torch.device,
    route_shape: tuple[int, int] | None = None,
) -> StepBatch:
    """Rollouts ``ids`` (this rank's share) as a ``StepBatch`` on ``device``. ``teacher_prefix_of``:
    the teacher prompt of each of them that needs a teacher (``teacher_prefixes``). ``route_shape``:
    (MoE layers, k) of a student whose routes are replayed: the engine's (``rollout``), or none yet
    (``old``: the old-log-prob pass records them)."""
    if alg.variant in ("grpo", "advantage_mix") and bool(routing.route_sdpo.any()):
        raise ValueError(f"variant {alg.variant!r} has no SDPO branch but route_sdpo is set")
    index = torch.tensor(ids, dtype=torch.long)
    local = {i: k for k, i in enumerate(ids)}
    step = StepBatch.build(
        [batch.prompt_ids[i] for i in ids],
        [batch.response_ids[i] for i in ids],
        rollout_logp=[batch.rollout_logp[i] for i in ids],
        advantages=advantages[index],
        route_sdpo=routing.route_sdpo[index],
        has_teacher=routing.has_teacher[index],
        fallback=routing.fallback[index],
        teacher_prefixes={local[i]: prefix for i, prefix in teacher_prefix_of.items()},
        topk=alg.topk if alg.uses_teacher else 0,
        pad_id=pad_id,
        routes=_step_routes(batch, ids, alg.routing_replay, route_shape),
    )
    return step.to(device)


def _step_routes(batch: RolloutBatch, ids: list[int], mode: str, shape) -> list[torch.Tensor] | None:
    """Each rollout's routes for the step batch (``algorithm.routing_replay``; expert_routes.py)."""
    if mode == "none" or shape is None:
        return None
    lengths = [len(batch.prompt_ids[i]) + len(batch.response_ids[i]) for i in ids]
    if mode == "old":
        return [torch.full((n, *shape), -1, dtype=torch.int16) for n in lengths]
    if batch.routed_experts is None:
        raise ValueError("routing_replay 'rollout': the rollout engine returned no routed experts")
    routes = [batch.routed_experts[i] for i in ids]
    for i, r, n in zip(ids, routes, lengths, strict=True):
        if tuple(r.shape) != (n, *shape):
            raise ValueError(f"rollout {i}: routed experts of shape {tuple(r.shape)}, expected {(n, *shape)}")
    return routes


def compute_old_logp(
    actor: MegatronActor, step: StepBatch, routing_replay: str = "none"
) -> dict[str, Metric]:
    """pi_old: the student's forward pass on the step's sequences; its log-probs (and top-K ids,
    where the batch has that column) go into the step batch. A MoE student (``routing_replay``,
    expert_routes.py): ``rollout`` replays the engine's routes and returns ``moe/route_flip``, the
    share of them its live router would have chosen otherwise; ``old`` records its routes into the
    step batch."""
    mbs = actor.micro_batches(step.student)
    topk = 0 if step.topk_ids is None else step.topk_ids.shape[1]
    rollout_routes = routing_replay == "rollout" and step.student.routes is not None
    record = routing_replay == "old" and step.student.routes is not None
    stats = actor.forward(
        mbs,
        teacher=False,
        topk=topk,
        routes=RoutePass(replay=rollout_routes, compare=rollout_routes, record=record),
        record_into=step.student.routes if record else None,
    )
    for mb, s in zip(mbs, stats or [], strict=False):  # None off the last stage
        step.old_logp[mb.span] = s.logp
        if topk:
            step.topk_ids[mb.span] = s.topk_ids
    return {"moe/route_flip": actor.take_route_flips()} if rollout_routes else {}


def compute_teacher_stats(actor: MegatronActor, step: StepBatch) -> None:
    """The EMA teacher's forward pass on [teacher prompt ; response] of the rollouts that need it,
    at the student's top-K ids (``compute_old_logp`` first); into the step batch's teacher columns."""
    teacher, teacher_rows = step.teacher, step.teacher_rows
    if teacher is None:  # none here; under expert parallelism other ranks may have some
        teacher = Sequences.empty(step.student.pad_id, step.old_logp.device)
        teacher_rows = torch.zeros(0, dtype=torch.long, device=step.old_logp.device)
    mbs = actor.micro_batches(teacher)
    if not mbs:
        return
    rows = [teacher_rows[mb.span] for mb in mbs]
    stats = actor.forward(mbs, teacher=True, gather_ids=[step.topk_ids[r] for r in rows], want_entropy=True)
    for r, s in zip(rows, stats or [], strict=False):  # None off the last stage
        step.teacher_topk_logp[r] = s.gathered_logp
        step.teacher_entropy[r] = s.entropy
        step.teacher_logp[r] = s.logp


def rollout_metrics(
    batch: RolloutBatch, rewards: torch.Tensor, parsed: torch.Tensor, routing, variant: str
) -> dict[str, float]:
    """The step's rollout statistics, from numbers every rank holds alike (no communication)."""
    lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float32)
    sdpo = routing.route_sdpo.float()
    grpo = torch.zeros_like(sdpo) if variant == "sdpo" else 1.0 - sdpo  # sdpo: the others get no loss
    return {
        "reward_mean": rewards.mean().item(),
        "format_rate": parsed.float().mean().item(),
        "sdpo_fraction": sdpo.mean().item(),
        "grpo_fraction": grpo.mean().item(),
        "fallback_fraction": routing.fallback.float().mean().item(),
        "response_length_mean": lengths.mean().item(),
        "stop_fraction": sum(r == "stop" for r in batch.finish_reasons) / len(batch),
        "teacher_rollouts": int(routing.needs_teacher.sum()),
    }


def step_stats(step: StepBatch) -> dict[str, Metric]:
    """The step's statistics of its passes (last pipeline stage): |actor - engine| log-prob of the
    sampled tokens, and the teacher's entropy over the tokens it read."""
    gap = (step.old_logp.double() - step.rollout_logp.double()).abs()
    everywhere = torch.ones_like(gap, dtype=torch.bool)
    out: dict[str, Metric] = {
        "logp_gap_mean": Mean.over(gap, everywhere),
        "logp_gap_max": Max.over(gap, everywhere),
    }
    if step.teacher_entropy is not None:
        entropy = step.teacher_entropy  # 0 at the tokens of rollouts without a teacher
        count = torch.tensor(len(step.teacher_rows) if step.teacher is not None else 0, device=entropy.device)
        out["teacher_entropy_mean"] = Mean(entropy.double().sum(), count)
    return out


def reduce_weight_stats(
    step: StepBatch, span: slice, beta: float, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of exp(-beta H) over the SDPO tokens ``span`` of the step batch, on every rank of
    ``group`` (data parallel): the denominator of the dynamic weights (ALGORITHM.md sec. 5), on the
    device."""
    total = torch.stack(compute_weight_stats(step.teacher_entropy[span], step.route_sdpo[span], beta))
    dist.all_reduce(total, group=group)
    return total[0], total[1]
