"""One data-parallel rank's share of a training step, token-major, on the rank's device.

A step trains on R rollouts (this rank's share: whole prompt groups). Rollout r is the sequence
``prefix_r + response_r`` and its response tokens are the targets. The output at position p
predicts token p + 1, so response token t is predicted at position ``len(prefix_r) - 1 + t``, and
only those positions go through the output layer (the ops take ``hidden[rows, cols]``), so long
prompts cost nothing in the 151,936-wide vocabulary projection.

    Sequences    a pass's model input: tokens [S, L] right-padded, and per target (n in all, in
                 sequence order) its sequence ``seq`` and predicting position ``col``; for a MoE
                 model's routing replay, each position's experts (expert_routes.py)
    StepBatch    the student's sequences (the rollouts) and one row per target token, N in all:
                   target, rollout_logp, advantage, route_sdpo, has_teacher, fallback   (rollouts)
                   old_logp [N], topk_ids [N, K]                     (old-log-prob pass fills)
                   teacher_topk_logp [N, K], teacher_entropy [N], teacher_logp [N]
                                  (teacher pass fills, at ``teacher_rows``; 0 elsewhere)
                 and the teacher's sequences (teacher prompt + response of the rollouts that need
                 a teacher), whose n-th target is row ``teacher_rows[n]``
    MicroBatch   sequences [first, last) of one pass as [B, L] (filler rows at the end, which carry
                 no target), and the span of their targets: a slice of the columns, not a copy

The batch is built on the host from the rollouts' lists and moved to the device in one place
(``StepBatch.to``). From there on nothing reads a value back: micro-batch shapes and spans come
from lengths the host already holds.

Micro-batches of one forward_backward call share one shape [micro_batch_size, seq_len] (Megatron's
pipeline schedule sends fixed-shape activations between stages).
"""

import dataclasses
from dataclasses import dataclass

import torch

from srpo_megatron.algorithms import LossBatch


@dataclass(frozen=True)
class MicroBatch:
    tokens: torch.Tensor  # [B, L] int64, right-padded
    position_ids: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [n] row of ``tokens`` holding each target's sequence
    cols: torch.Tensor  # [n] position whose output predicts each target
    targets: torch.Tensor  # [n] the target token ids
    span: slice  # the targets' rows in the pass's columns
    seqs: slice  # its sequences in the pass's
    routes: torch.Tensor | None  # [B, L, layers, k] int16: each position's experts (expert_routes.py)


@dataclass(frozen=True)
class Sequences:
    tokens: torch.Tensor  # [S, L] int64, right-padded with pad_id
    seq: torch.Tensor  # [n] the sequence of each target
    col: torch.Tensor  # [n] the position whose output predicts it
    target: torch.Tensor  # [n] its token id
    lengths: tuple[int, ...]  # host: each sequence's length
    starts: tuple[int, ...]  # host: S + 1 offsets; sequence s's targets are rows starts[s]:starts[s + 1]
    pad_id: int
    routes: torch.Tensor | None = None  # [S, L, layers, k] int16, -1 unrecorded (expert_routes.py)

    @classmethod
    def build(
        cls,
        prefixes: list[list[int]],
        responses: list[list[int]],
        pad_id: int,
        routes: list[torch.Tensor] | None = None,
    ) -> "Sequences":
        """``prefix_i + response_i`` on the host; the responses' tokens are the targets. ``routes``:
        a MoE router's experts at each position of each sequence ([length, layers, k])."""
        if len(prefixes) != len(responses):
            raise ValueError(f"{len(prefixes)} prefixes but {len(responses)} responses")
        if not prefixes:
            raise ValueError("no sequences")
        if any(len(p) == 0 for p in prefixes):
            raise ValueError(
                "every sequence needs at least one prefix token (the response is predicted from it)"
            )
        lengths = [len(p) + len(r) for p, r in zip(prefixes, responses, strict=True)]
        tokens = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
        seq, col, target, starts = [], [], [], [0]
        for s, (prefix, response) in enumerate(zip(prefixes, responses, strict=True)):
            tokens[s, : lengths[s]] = torch.tensor(prefix + response, dtype=torch.long)
            seq += [s] * len(response)
            col += range(len(prefix) - 1, len(prefix) - 1 + len(response))
            target += response
            starts.append(len(target))
        seq, col, target = (torch.tensor(v, dtype=torch.long) for v in (seq, col, target))
        padded_routes = None
        if routes is not None:
            padded_routes = torch.full(
                (len(lengths), max(lengths), *routes[0].shape[1:]), -1, dtype=torch.int16
            )
            for s, r in enumerate(routes):
                if r.shape[0] != lengths[s]:
                    raise ValueError(f"sequence {s}: routes for {r.shape[0]} positions, {lengths[s]} tokens")
                padded_routes[s, : lengths[s]] = r
        return cls(tokens, seq, col, target, tuple(lengths), tuple(starts), pad_id, padded_routes)

    @classmethod
    def empty(cls, pad_id: int, device: torch.device) -> "Sequences":
        """No sequence: this rank's part in a pass that other ranks run (``micro_batches`` with their
        ``longest`` and ``count`` gives it filler micro-batches)."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(torch.zeros((0, 0), dtype=torch.long, device=device), none, none, none, (), (0,), pad_id)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    def span(self, first: int, last: int) -> slice:
        """The target rows of sequences [first, last)."""
        return slice(self.starts[first], self.starts[last])

    def micro_batches(
        self,
        first: int,
        last: int,
        *,
        token_budget: int,
        multiple: int = 1,
        longest: int | None = None,
        count: int | None = None,
    ) -> list[MicroBatch]:
        """Sequences [first, last) as micro-batches of one shape: as many sequences of the longest
        one's length as fit the token budget (at least one), padded to a multiple of ``multiple``
        (sequence parallelism splits the sequence evenly over tensor-parallel ranks).

        ``longest`` / ``count``: plan for that longest sequence and that many sequences instead
        (at least this range's), so that ranks whose ranges differ run the same number of
        micro-batches of the same shape; micro-batches past ``last`` are filler (no target).
        """
        if not 0 <= first <= last <= self.num_sequences:
            raise ValueError(f"sequences [{first}, {last}) of {self.num_sequences}")
        longest = max([longest or 0, *self.lengths[first:last]])
        count = max(count or 0, last - first)
        if count == 0:
            raise ValueError(f"no sequences in [{first}, {last})")
        size = max(1, min(count, token_budget // longest))
        seq_len = -(-longest // multiple) * multiple
        device = self.tokens.device
        positions = torch.arange(seq_len, device=device).expand(size, seq_len)
        out = []
        for start in range(first, first + count, size):
            a, b = min(start, last), min(start + size, last)
            # right padding: filler rows, and columns past the sequences' own
            pad = (0, seq_len - min(seq_len, self.tokens.shape[1]), 0, size - (b - a))
            tokens = _padded(self.tokens[a:b, :seq_len], pad, self.pad_id)
            routes = None
            if self.routes is not None:
                routes = _padded(self.routes[a:b, :seq_len], (0, 0, 0, 0, *pad), -1)
            span = self.span(a, b)
            rows = self.seq[span] - a
            out.append(
                MicroBatch(
                    tokens, positions, rows, self.col[span], self.target[span], span, slice(a, b), routes
                )
            )
        return out

    def to(self, device: torch.device) -> "Sequences":
        return dataclasses.replace(self, **_moved(self, device, ("tokens", "seq", "col", "target", "routes")))


@dataclass(frozen=True)
class StepBatch:
    student: Sequences
    teacher: Sequences | None  # None: no rollout of this share needs the teacher
    teacher_rows: torch.Tensor | None  # [N_T] the row of each teacher target
    rollout_logp: torch.Tensor  # [N] the engine's log-prob of each target
    advantage: torch.Tensor  # [N] its rollout's group-relative advantage
    route_sdpo: torch.Tensor  # [N] bool, its rollout is on the SDPO branch
    has_teacher: torch.Tensor  # [N] bool, its rollout has a correct sibling
    fallback: torch.Tensor  # [N] bool, its rollout is wrong without a correct sibling
    old_logp: torch.Tensor  # [N] pi_old (the old-log-prob pass)
    topk_ids: torch.Tensor | None  # [N, K] the student's top-K ids (None: the variant has no teacher)
    teacher_topk_logp: torch.Tensor | None  # [N, K] the teacher at topk_ids
    teacher_entropy: torch.Tensor | None  # [N] its full-vocabulary entropy
    teacher_logp: torch.Tensor | None  # [N] its log-prob of the target

    @classmethod
    def build(
        cls,
        prompts: list[list[int]],
        responses: list[list[int]],
        *,
        rollout_logp: list[torch.Tensor],
        advantages: torch.Tensor,
        route_sdpo: torch.Tensor,
        has_teacher: torch.Tensor,
        fallback: torch.Tensor,
        teacher_prefixes: dict[int, list[int]],
        topk: int,
        pad_id: int,
        routes: list[torch.Tensor] | None = None,
    ) -> "StepBatch":
        """On the host. Per-rollout inputs are [R] (``rollout_logp``: R tensors of each response's
        length); ``teacher_prefixes``: rollout -> its teacher prompt, for those that need a teacher;
        ``topk``: K, 0 for a variant without a teacher (no top-K or teacher columns); ``routes``: the
        student's expert routes (a MoE model's routing replay; the teacher routes live)."""
        student = Sequences.build(prompts, responses, pad_id, routes)
        n = student.target.numel()
        lengths = torch.tensor([len(r) for r in responses])

        def per_token(values: torch.Tensor) -> torch.Tensor:  # [R] -> [N]
            return values.repeat_interleave(lengths)

        teacher = teacher_rows = None
        if teacher_prefixes:
            ids = sorted(teacher_prefixes)
            teacher = Sequences.build([teacher_prefixes[i] for i in ids], [responses[i] for i in ids], pad_id)
            teacher_rows = torch.cat([torch.arange(*student.span(i, i + 1).indices(n)) for i in ids])
        return cls(
            student=student,
            teacher=teacher,
            teacher_rows=teacher_rows,
            rollout_logp=torch.cat(rollout_logp).float() if n else torch.zeros(0),
            advantage=per_token(advantages.float()),
            route_sdpo=per_token(route_sdpo.bool()),
            has_teacher=per_token(has_teacher.bool()),
            fallback=per_token(fallback.bool()),
            old_logp=torch.zeros(n),
            topk_ids=torch.zeros(n, topk, dtype=torch.long) if topk else None,
            teacher_topk_logp=torch.zeros(n, topk) if topk else None,
            teacher_entropy=torch.zeros(n) if topk else None,
            teacher_logp=torch.zeros(n) if topk else None,
        )

    def to(self, device: torch.device) -> "StepBatch":
        """Every tensor of the batch on ``device``: the one place a step's data moves."""
        moved = _moved(self, device, [f.name for f in dataclasses.fields(self)])
        moved["student"] = self.student.to(device)
        if self.teacher is not None:
            moved["teacher"] = self.teacher.to(device)
        return dataclasses.replace(self, **moved)

    def loss_batch(self, span: slice) -> LossBatch:
        """The loss inputs of targets ``span``, token-major (each target a row of one token: [n, 1]),
        but the log-probs of the pass being trained; views of the columns."""

        def token(column: torch.Tensor | None) -> torch.Tensor | None:
            return None if column is None else column[span].unsqueeze(1)

        return LossBatch(
            old_logp=token(self.old_logp),
            rollout_logp=token(self.rollout_logp),
            loss_mask=torch.ones_like(token(self.old_logp)),
            advantages=self.advantage[span],
            route_sdpo=self.route_sdpo[span],
            has_teacher=self.has_teacher[span],
            fallback=self.fallback[span],
            topk_ids=token(self.topk_ids),
            teacher_topk_logp=token(self.teacher_topk_logp),
            teacher_entropy=token(self.teacher_entropy),
            teacher_logp=token(self.teacher_logp),
        )


def _padded(x: torch.Tensor, pad: tuple[int, ...], value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, pad, value=value) if any(pad) else x


def _moved(obj, device: torch.device, names) -> dict[str, torch.Tensor]:
    fields = {name: getattr(obj, name) for name in names}
    return {k: v.to(device, non_blocking=True) for k, v in fields.items() if isinstance(v, torch.Tensor)}
