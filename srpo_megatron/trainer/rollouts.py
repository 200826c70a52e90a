"""One step's rollouts (a ``RolloutBatch``, the same on every rank) and what the step computes from
them, one free function each ("pass": a forward pass of the actor; "DP": a collective over the
data-parallel group, passed in):

    generate_rollouts       rank 0 samples, every rank receives the batch           broadcast
    sample_rollouts         rank 0's part of it (async_rollouts.py runs it on a thread)
    compute_rewards         each prompt's verifier on each response -> [R]
    compute_old_logp        the student's log-probs (+ top-K ids) of this rank's share    pass
    teacher_prefixes        the teacher prompts (with a correct sibling's solution)
    compute_teacher_stats   the EMA teacher at the student's tokens and top-K ids         pass
    build_loss_inputs       one micro-batch's ``LossBatch``, but the trained pass's log-probs
    rollout_metrics         the step's rollout statistics (no communication)
    reduce_teacher_entropy  the teacher's mean entropy over the step                      DP
    reduce_logp_gap         the actor-engine log-prob gap over the step                   DP
    reduce_weight_stats     the dynamic weights' global sum and count                     DP

Rollouts are indexed by their place in the step. The actor passes return dicts ``{rollout: record}``
of this data-parallel rank's share on the last pipeline stage (where the output layer is), None on
the other stages.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from srpo_megatron.algorithms import LossBatch, compute_weight_stats
from srpo_megatron.config import Config
from srpo_megatron.data.teacher_prompt import build_teacher_input_ids
from srpo_megatron.rewards.registry import get_reward_fn
from srpo_megatron.rollout.engine import RolloutBatch, SamplingParams
from srpo_megatron.rollout.metrics import LogpGap, logp_gap
from srpo_megatron.runtime.distributed import from_rank_0
from srpo_megatron.trainer.actor import MegatronActor
from srpo_megatron.trainer.batching import MicroBatch, build_micro_batches


@dataclass(frozen=True)
class OldLogp:
    """One rollout's pi_old numbers (the student before this step's updates)."""

    logp: torch.Tensor  # [T] log-prob of each response token
    topk_ids: torch.Tensor | None  # [T, K] the student's top-K ids (None: the variant has no teacher)


@dataclass(frozen=True)
class TeacherStats:
    """One rollout's EMA-teacher numbers at the student's tokens."""

    topk_logp: torch.Tensor  # [T, K] at the student's top-K ids
    entropy: torch.Tensor  # [T] over the full vocabulary
    logp: torch.Tensor  # [T] of each response token


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
    )
    batch = engine.generate([row.prompt_ids for row in rows], params)
    engine.release_memory()
    return batch


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def compute_rewards(batch: RolloutBatch, rows, tokenizer, tool_use_parser: str) -> torch.Tensor:
    """[R] rewards from each prompt's verifier (``reward.tool_use_parser`` for tool use); a verifier
    never raises on the response text."""
    rewards = []
    for prompt, response in zip(batch.prompt_index, batch.response_ids, strict=True):
        row = rows[prompt].row
        text = tokenizer.decode(response, skip_special_tokens=True)
        reward_fn = get_reward_fn(row.data_source, tool_use_parser=tool_use_parser)
        rewards.append(reward_fn(text, row.ground_truth).score)
    return torch.tensor(rewards, dtype=torch.float32)


def compute_old_logp(
    actor: MegatronActor, batch: RolloutBatch, ids: list[int], *, topk: int, pad_id: int, token_budget: int
) -> dict[int, OldLogp] | None:
    """pi_old of rollouts ``ids``: the student's forward pass on [prompt ; response]."""
    mbs = build_micro_batches(
        [batch.prompt_ids[i] for i in ids],
        [batch.response_ids[i] for i in ids],
        pad_id=pad_id,
        token_budget=token_budget,
    )
    stats = actor.forward(mbs, teacher=False, topk=topk)
    if stats is None:
        return None
    out: dict[int, OldLogp] = {}
    for mb, s in zip(mbs, stats, strict=True):
        for row, (logp, topk_ids) in _per_row(mb, s.logp, s.topk_ids):
            out[ids[row]] = OldLogp(logp, topk_ids)
    return out


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


def compute_teacher_stats(
    actor: MegatronActor,
    batch: RolloutBatch,
    ids: list[int],
    prefixes: list[list[int]],
    old: dict[int, OldLogp] | None,
    *,
    pad_id: int,
    token_budget: int,
) -> dict[int, TeacherStats] | None:
    """The EMA teacher's forward pass on [prefix ; response] of rollouts ``ids``, at the student's
    top-K ids (``old``, on the last stage)."""
    if not ids:
        return {} if old is not None else None
    mbs = build_micro_batches(
        prefixes, [batch.response_ids[i] for i in ids], pad_id=pad_id, token_budget=token_budget
    )
    gather = None
    if old is not None:  # last stage: the student's top-K ids of the same tokens
        gather = [torch.cat([old[ids[int(r)]].topk_ids for r in mb.index if r >= 0]) for mb in mbs]
    stats = actor.forward(mbs, teacher=True, gather_ids=gather, want_entropy=True)
    if stats is None:
        return None
    out: dict[int, TeacherStats] = {}
    for mb, s in zip(mbs, stats, strict=True):
        for row, (topk_logp, entropy, logp) in _per_row(mb, s.gathered_logp, s.entropy, s.logp):
            out[ids[row]] = TeacherStats(topk_logp, entropy, logp)
    return out


def build_loss_inputs(
    mb: MicroBatch,
    ids: list[int],
    batch: RolloutBatch,
    routing,
    advantages: torch.Tensor,
    old: dict[int, OldLogp],
    teacher: dict[int, TeacherStats] | None,
) -> LossBatch:
    """Everything the SRPO loss needs for micro-batch ``mb`` of rollouts ``ids``, in the [B, T]
    layout, but the log-probs of the pass being trained (filler rows: zeros)."""
    rollout_of = [ids[int(r)] if r >= 0 else None for r in mb.index]
    any_old = next(iter(old.values()))
    k = 0 if any_old.topk_ids is None else any_old.topk_ids.shape[-1]  # top-K size, 0: unused

    def rows(get, shape_tail=(), dtype=torch.float32):
        out = torch.zeros((*mb.response_mask.shape, *shape_tail), dtype=dtype)
        for b, i in enumerate(rollout_of):
            value = get(i) if i is not None else None
            if value is not None:
                out[b, : value.shape[0]] = value
        return out

    def per_rollout(values, dtype):
        return torch.tensor([bool(values[i]) if i is not None else False for i in rollout_of], dtype=dtype)

    def of_teacher(field: str, shape_tail=()):
        if not teacher:
            return None
        return rows(lambda i: getattr(teacher[i], field) if i in teacher else None, shape_tail)

    return LossBatch(
        old_logp=rows(lambda i: old[i].logp),
        rollout_logp=rows(lambda i: batch.rollout_logp[i]),
        loss_mask=mb.response_mask.float(),
        advantages=torch.tensor([float(advantages[i]) if i is not None else 0.0 for i in rollout_of]),
        route_sdpo=per_rollout(routing.route_sdpo, torch.bool),
        has_teacher=per_rollout(routing.has_teacher, torch.bool),
        fallback=per_rollout(routing.fallback, torch.bool),
        topk_ids=rows(lambda i: old[i].topk_ids, (k,), torch.long) if k else None,
        teacher_topk_logp=of_teacher("topk_logp", (k,)),
        teacher_entropy=of_teacher("entropy"),
        teacher_logp=of_teacher("logp"),
    )


def rollout_metrics(batch: RolloutBatch, rewards: torch.Tensor, routing, variant: str) -> dict[str, float]:
    """The step's rollout statistics, from numbers every rank holds alike (no communication)."""
    lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float32)
    sdpo = routing.route_sdpo.float()
    grpo = torch.zeros_like(sdpo) if variant == "sdpo" else 1.0 - sdpo  # sdpo: the others get no loss
    return {
        "reward_mean": rewards.mean().item(),
        "sdpo_fraction": sdpo.mean().item(),
        "grpo_fraction": grpo.mean().item(),
        "fallback_fraction": routing.fallback.float().mean().item(),
        "response_length_mean": lengths.mean().item(),
        "stop_fraction": sum(r == "stop" for r in batch.finish_reasons) / len(batch),
        "teacher_rollouts": int(routing.needs_teacher.sum()),
    }


def reduce_teacher_entropy(teacher: dict[int, TeacherStats] | None, group) -> dict[str, float]:
    """The teacher's mean entropy over every SDPO token of the step: every rank of ``group`` (data
    parallel) ran the teacher on its share; only the last pipeline stage has entropies (0 elsewhere)."""
    entropy = torch.cat([t.entropy for t in teacher.values()]) if teacher else torch.zeros(0)
    sums = torch.tensor([entropy.double().sum(), entropy.numel()], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    return {"teacher_entropy_mean": float(sums[0] / sums[1]) if sums[1] > 0 else 0.0}


def reduce_logp_gap(old: dict[int, OldLogp], batch: RolloutBatch, group) -> dict[str, float]:
    """|actor - engine| log-prob of the sampled tokens over the step's rollouts, from every rank of
    ``group`` (data parallel, on the last pipeline stage)."""
    train_logp = torch.cat([old[i].logp for i in old])
    rollout_logp = torch.cat([batch.rollout_logp[i] for i in old])
    gap = logp_gap(train_logp, rollout_logp, torch.ones_like(train_logp))
    sums = torch.tensor([gap.abs_sum, float(gap.num_tokens)], dtype=torch.float64)
    peak = torch.tensor([gap.max_abs], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = LogpGap(abs_sum=float(sums[0]), max_abs=float(peak[0]), num_tokens=int(sums[1]))
    return total.as_metrics(prefix="logp_gap")


def reduce_weight_stats(inputs: list[LossBatch], beta: float, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of exp(-beta H) over every SDPO token of a mini-batch's loss inputs, on every
    rank of ``group`` (data parallel): the denominator of the dynamic weights (ALGORITHM.md sec. 5)."""
    total = torch.zeros(2, dtype=torch.float64)
    for x in inputs:
        if x.teacher_entropy is None:
            continue
        s, c = compute_weight_stats(x.teacher_entropy, x.loss_mask.bool() & x.route_sdpo[:, None], beta)
        total += torch.stack([s.double(), c.double()])
    dist.all_reduce(total, group=group)
    return total[0], total[1]


def _per_row(mb: MicroBatch, *flat: torch.Tensor | None):
    """Split flat [N, ...] per-token tensors into per-row pieces: yields (row index, pieces)."""
    lengths = mb.response_mask.sum(dim=1).tolist()
    offset = 0
    for r, n in zip(mb.index.tolist(), lengths, strict=True):
        if r >= 0:
            yield r, tuple(None if t is None else t[offset : offset + n].cpu() for t in flat)
        offset += n
