import pytest
import torch

from srpo_megatron.trainer.batching import build_micro_batches, plan_micro_batches


def test_plan_respects_budget_and_takes_at_least_one():
    assert plan_micro_batches([10, 30, 20], token_budget=100) == (3, 30)
    assert plan_micro_batches([10, 30, 20], token_budget=60) == (2, 30)
    assert plan_micro_batches([10, 30, 20], token_budget=5) == (1, 30)


def test_scored_positions_predict_the_response_tokens():
    prefixes = [[1, 2, 3], [4], [5, 6]]
    responses = [[7], [9, 10, 11], [12]]
    batches = build_micro_batches(prefixes, responses, pad_id=0, token_budget=8)
    # longest sequence 4 tokens, budget 8 -> 2 rows per micro-batch, last one with a filler row
    assert [tuple(b.tokens.shape) for b in batches] == [(2, 4), (2, 4)]
    first, second = batches
    assert first.tokens.tolist() == [[1, 2, 3, 7], [4, 9, 10, 11]]
    # output at position p predicts token p + 1
    assert first.tokens[first.rows, first.cols + 1].tolist() == first.targets.tolist() == [7, 9, 10, 11]
    assert second.index.tolist() == [2, -1]
    assert second.response_mask.tolist() == [[True, False, False], [False, False, False]]
    # flat per-token values round-trip through the [B, T] response layout
    flat = torch.arange(first.num_tokens, dtype=torch.float32)
    laid_out = first.to_response_layout(flat, fill=-1.0)
    assert laid_out.tolist() == [[0.0, -1.0, -1.0], [1.0, 2.0, 3.0]]
    assert torch.equal(first.from_response_layout(laid_out), flat)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="prefix"):
        build_micro_batches([[]], [[1]], pad_id=0, token_budget=8)
    with pytest.raises(ValueError, match="2 prefixes but 1"):
        build_micro_batches([[1], [2]], [[1]], pad_id=0, token_budget=8)
