"""Rollouts -> padded Megatron micro-batches, and per-token results back to [B, T_resp] tensors.

A sequence is ``prefix + response``: the prefix is the student's prompt (actor passes) or the
teacher prompt (EMA-teacher pass); either way the predicted tokens are the student's response ids. The
output at position p predicts token p + 1, so response token t of row b is predicted at sequence
position ``len(prefix_b) - 1 + t``. Only those positions go through the output layer (the ops take
``hidden[rows, cols]``), so long prompts cost nothing in the 151,936-wide vocabulary projection.

Micro-batches of one forward_backward call share one shape [micro_batch_size, seq_len] (Megatron's
pipeline schedule sends fixed-shape activations between stages); the last one is filled with empty
rows that carry no target and no loss.
"""

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, L] int64, right-padded
    position_ids: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] row of each predicted position
    cols: torch.Tensor  # [N] sequence position whose output predicts the response token
    targets: torch.Tensor  # [N] the response token ids
    response_mask: torch.Tensor  # [B, T] bool: response token t of row b exists
    index: torch.Tensor  # [B] which item of the caller's list each row is (-1 = filler row)

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to_response_layout(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[N, ...] per predicted token -> [B, T, ...] aligned with the responses (``fill`` elsewhere)."""
        out = flat.new_full((*self.response_mask.shape, *flat.shape[1:]), fill)
        out[self.response_mask] = flat
        return out

    def from_response_layout(self, per_row: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...] at the predicted tokens (e.g. the student's top-k ids for the teacher)."""
        return per_row[self.response_mask]


def plan_micro_batches(seq_lens: list[int], token_budget: int) -> tuple[int, int]:
    """(micro_batch_size, seq_len) for sequences of these lengths under a token budget per micro-batch.

    seq_len is the longest sequence; at least one sequence per micro-batch.
    """
    if not seq_lens:
        raise ValueError("no sequences to batch")
    seq_len = max(seq_lens)
    return max(1, min(len(seq_lens), token_budget // seq_len)), seq_len


def build_micro_batches(
    prefixes: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    token_budget: int,
    response_len: int | None = None,
) -> list[MicroBatch]:
    """Pack ``prefix_i + response_i`` into equal-shape micro-batches, in order.

    ``response_len`` fixes T of the response layout (default: the longest response).
    """
    if len(prefixes) != len(responses):
        raise ValueError(f"{len(prefixes)} prefixes but {len(responses)} responses")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every sequence needs at least one prefix token (the response is predicted from it)")
    seq_lens = [len(p) + len(r) for p, r in zip(prefixes, responses, strict=True)]
    mbs, seq_len = plan_micro_batches(seq_lens, token_budget)
    resp_t = response_len or max(max(len(r) for r in responses), 1)
    batches = []
    for start in range(0, len(prefixes), mbs):
        items = list(range(start, min(start + mbs, len(prefixes))))
        batches.append(_pack(items, prefixes, responses, mbs, seq_len, resp_t, pad_id))
    return batches


def _pack(items, prefixes, responses, mbs, seq_len, resp_t, pad_id) -> MicroBatch:
    tokens = torch.full((mbs, seq_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros(mbs, resp_t, dtype=torch.bool)
    index = torch.full((mbs,), -1, dtype=torch.long)
    rows, cols, targets = [], [], []
    for row, i in enumerate(items):
        prefix, response = prefixes[i], responses[i]
        if len(response) > resp_t:
            raise ValueError(f"response {i} has {len(response)} tokens, more than the layout's {resp_t}")
        seq = prefix + response
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        response_mask[row, : len(response)] = True
        index[row] = i
        rows += [row] * len(response)
        cols += range(len(prefix) - 1, len(prefix) - 1 + len(response))
        targets += response
    return MicroBatch(
        tokens=tokens,
        position_ids=torch.arange(seq_len).expand(mbs, seq_len).contiguous(),
        rows=torch.tensor(rows, dtype=torch.long),
        cols=torch.tensor(cols, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        response_mask=response_mask,
        index=index,
    )
