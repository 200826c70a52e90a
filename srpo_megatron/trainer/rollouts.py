"""One step's rollouts and everything derived from them per rollout: rewards, the actor's old
log-probs and top-K ids, the EMA teacher's numbers, and the per-micro-batch training inputs.

Per-rollout tensors are kept in lists indexed by the rollout's position in the step (only this
data-parallel rank's share is filled, and only on the last pipeline stage, where the output layer is).
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.data.teacher_prompt import build_teacher_input_ids
from srpo_megatron.rewards.registry import get_reward_fn
from srpo_megatron.rollout.engine import RolloutBatch, SamplingParams
from srpo_megatron.rollout.metrics import LogpGap, logp_gap
from srpo_megatron.runtime.distributed import from_rank_0
from srpo_megatron.trainer.actor import MegatronActor, TrainInputs
from srpo_megatron.trainer.batching import MicroBatch, build_micro_batches


@dataclass
class StepRollouts:
    batch: RolloutBatch
    pad_id: int
    token_budget: int
    rewards: torch.Tensor = field(default=None)  # [R]
    teacher_rows: int = 0  # rollouts this rank's teacher pass scored

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def group_ids(self) -> torch.Tensor:  # [R]
        return torch.tensor(self.batch.prompt_index, dtype=torch.long)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return self.batch.prompt_ids

    @property
    def response_ids(self) -> list[list[int]]:
        return self.batch.response_ids

    def score(self, rows, tokenizer, tool_use_parser: str) -> None:
        """Rewards from each prompt's verifier (``reward.tool_use_parser`` for tool use); a verifier
        never raises on the response text."""
        rewards = []
        for i, response in enumerate(self.batch.response_ids):
            row = rows[self.batch.prompt_index[i]].row
            text = tokenizer.decode(response, skip_special_tokens=True)
            reward_fn = get_reward_fn(row.data_source, tool_use_parser=tool_use_parser)
            rewards.append(reward_fn(text, row.ground_truth).score)
        self.rewards = torch.tensor(rewards, dtype=torch.float32)

    # ---- actor passes ---------------------------------------------------------------------------

    def _micro_batches(self, prefixes, ids) -> list[MicroBatch]:
        return build_micro_batches(
            prefixes, [self.response_ids[i] for i in ids], pad_id=self.pad_id, token_budget=self.token_budget
        )

    def score_student(self, actor: MegatronActor, ids: list[int], topk: int) -> dict[int, dict] | None:
        """pi_old: {rollout: {"logp": [T_i], "topk_ids": [T_i, K] | None}} on the last stage."""
        mbs = self._micro_batches([self.prompt_ids[i] for i in ids], ids)
        stats = actor.score(mbs, teacher=False, topk=topk)
        if stats is None:
            return None
        out: dict[int, dict] = {}
        for mb, s in zip(mbs, stats, strict=True):
            for row, (logp, topk_ids) in _per_row(mb, s.logp, s.topk_ids):
                out[ids[row]] = {"logp": logp, "topk_ids": topk_ids}
        return out

    def score_teacher(
        self, actor: MegatronActor, ids: list[int], routing, old: dict | None, tokenizer, rows, cfg: Config
    ) -> dict[int, dict] | None:
        """The EMA teacher on [teacher prompt ; student response] for the SDPO-routed rollouts ``ids``:
        {rollout: {"topk_logp": [T_i, K] at the student's top-K ids, "entropy": [T_i], "logp": [T_i]}}."""
        if not ids:
            return {} if old is not None else None
        prefixes = []
        for i in ids:
            sibling = int(routing.sibling[i])
            teacher_ids, prompt_len = build_teacher_input_ids(
                tokenizer,
                rows[self.batch.prompt_index[i]].row.messages,
                self.response_ids[sibling],
                self.response_ids[i],
                cfg.algorithm.teacher_max_prompt_len,
            )
            prefixes.append(teacher_ids[:prompt_len])
        mbs = self._micro_batches(prefixes, ids)
        self.teacher_rows = sum(int((mb.index >= 0).sum()) for mb in mbs)
        gather = None
        if old is not None:  # last stage: the student's top-K ids of the same tokens
            gather = [torch.cat([old[ids[int(r)]]["topk_ids"] for r in mb.index if r >= 0]) for mb in mbs]
        stats = actor.score(mbs, teacher=True, gather_ids=gather, want_entropy=True)
        if stats is None:
            return None
        out: dict[int, dict] = {}
        for mb, s in zip(mbs, stats, strict=True):
            for row, (topk_logp, entropy, logp) in _per_row(mb, s.gathered_logp, s.entropy, s.logp):
                out[ids[row]] = {"topk_logp": topk_logp, "entropy": entropy, "logp": logp}
        return out

    def train_inputs(self, mb: MicroBatch, ids, routing, advantages, old, teacher) -> TrainInputs:
        """Everything the SRPO loss needs for micro-batch ``mb`` of rollouts ``ids``, in [B, T] layout."""
        rollout_of = [ids[int(r)] if r >= 0 else None for r in mb.index]
        any_old = next(iter(old.values()))
        k = 0 if any_old["topk_ids"] is None else any_old["topk_ids"].shape[-1]  # top-K size, 0: unused

        def rows(get, shape_tail=(), dtype=torch.float32):
            out = torch.zeros((*mb.response_mask.shape, *shape_tail), dtype=dtype)
            for b, i in enumerate(rollout_of):
                value = get(i) if i is not None else None
                if value is not None:
                    out[b, : value.shape[0]] = value
            return out

        def per_rollout(values, dtype):
            return torch.tensor(
                [bool(values[i]) if i is not None else False for i in rollout_of], dtype=dtype
            )

        has_teacher_rows = teacher is not None and len(teacher) > 0
        return TrainInputs(
            old_logp=rows(lambda i: old[i]["logp"]),
            rollout_logp=rows(lambda i: self.batch.rollout_logp[i]),
            advantages=torch.tensor([float(advantages[i]) if i is not None else 0.0 for i in rollout_of]),
            route_sdpo=per_rollout(routing.route_sdpo, torch.bool),
            has_teacher=per_rollout(routing.has_teacher, torch.bool),
            fallback=per_rollout(routing.fallback, torch.bool),
            topk_ids=rows(lambda i: old[i]["topk_ids"], (k,), torch.long) if k else None,
            teacher_topk_logp=rows(lambda i: teacher.get(i, {}).get("topk_logp"), (k,))
            if has_teacher_rows
            else None,
            teacher_entropy=rows(lambda i: teacher.get(i, {}).get("entropy")) if has_teacher_rows else None,
            teacher_logp=rows(lambda i: teacher.get(i, {}).get("logp")) if has_teacher_rows else None,
        )

    def metrics(self, routing, variant: str, old: dict | None, teacher: dict | None) -> dict[str, float]:
        """The step's rollout statistics. Routing is the same on every rank; the teacher's numbers
        and the log-prob gap are reduced over data parallel (collectives on every rank)."""
        lengths = torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)
        sdpo = routing.route_sdpo.float()
        grpo = torch.zeros_like(sdpo) if variant == "sdpo" else 1.0 - sdpo  # sdpo: the others get no loss
        out = {
            "reward_mean": self.rewards.mean().item(),
            "sdpo_fraction": sdpo.mean().item(),
            "grpo_fraction": grpo.mean().item(),
            "fallback_fraction": routing.fallback.float().mean().item(),
            "response_length_mean": lengths.mean().item(),
            "stop_fraction": sum(r == "stop" for r in self.batch.finish_reasons) / len(self),
        }
        # teacher rollouts and entropy: every rank scores its share; only the last stage has entropies
        entropy = torch.cat([t["entropy"] for t in teacher.values()]) if teacher else torch.zeros(0)
        sums = torch.tensor([self.teacher_rows, entropy.double().sum(), entropy.numel()], dtype=torch.float64)
        _all_reduce_over_data_parallel(sums)
        out["teacher_rollouts"] = int(sums[0])
        out["teacher_entropy_mean"] = float(sums[1] / sums[2]) if sums[2] > 0 else 0.0
        if old is not None:  # last pipeline stage: this rank's share, reduced over data parallel
            train_logp = torch.cat([old[i]["logp"] for i in old])
            rollout_logp = torch.cat([self.batch.rollout_logp[i] for i in old])
            gap = logp_gap(train_logp, rollout_logp, torch.ones_like(train_logp))
            out |= _reduce_gap_over_data_parallel(gap).as_metrics(prefix="logp_gap")
        return out


def _all_reduce_over_data_parallel(sums: torch.Tensor) -> None:
    from megatron.core import parallel_state

    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())


def _reduce_gap_over_data_parallel(gap: LogpGap) -> LogpGap:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    sums = torch.tensor([gap.abs_sum, float(gap.num_tokens)], dtype=torch.float64)
    peak = torch.tensor([gap.max_abs], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return LogpGap(abs_sum=float(sums[0]), max_abs=float(peak[0]), num_tokens=int(sums[1]))


def _per_row(mb: MicroBatch, *flat: torch.Tensor | None):
    """Split flat [N, ...] per-token tensors into per-row pieces: yields (row index, pieces)."""
    lengths = mb.response_mask.sum(dim=1).tolist()
    offset = 0
    for r, n in zip(mb.index.tolist(), lengths, strict=True):
        if r >= 0:
            yield r, tuple(None if t is None else t[offset : offset + n].cpu() for t in flat)
        offset += n


# ---- generation ------------------------------------------------------------------------------


def generate_rollouts(engine, cfg: Config, tokenizer, rows, *, seed: int) -> StepRollouts:
    """Rank 0 samples ``n`` responses per prompt; every rank receives the same batch. Colocated
    engines then give their GPU memory back for training (before the batch goes out, so that no
    rank starts its forward passes while the engines still hold it)."""

    def generate() -> RolloutBatch:
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

    batch = from_rank_0(generate, "rollout generation")
    return StepRollouts(batch, pad_id=tokenizer.pad_token_id or 0, token_budget=cfg.train.micro_batch_tokens)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)
