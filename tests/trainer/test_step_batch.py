import pytest
import torch

from srpo_megatron.trainer.step_batch import Sequences, StepBatch


def test_micro_batches_respect_the_budget_and_take_at_least_one():
    seqs = Sequences.build([[1] * 5, [2] * 20, [3] * 10], [[4] * 5, [5] * 10, [6] * 10], pad_id=0)

    def shapes(budget, **kw):
        return [tuple(m.tokens.shape) for m in seqs.micro_batches(0, 3, token_budget=budget, **kw)]

    assert shapes(100) == [(3, 30)]
    assert shapes(60) == [(2, 30), (2, 30)]  # the last one with a filler row
    assert shapes(5) == [(1, 30)] * 3
    assert shapes(60, multiple=4) == [(2, 32), (2, 32)]  # padded: sequence parallelism
    assert [tuple(m.tokens.shape) for m in seqs.micro_batches(0, 1, token_budget=100)] == [(1, 10)]


def test_targets_are_predicted_from_the_position_before_them():
    prefixes = [[1, 2, 3], [4], [5, 6]]
    responses = [[7], [9, 10, 11], [12]]
    seqs = Sequences.build(prefixes, responses, pad_id=0)
    first, second = seqs.micro_batches(0, 3, token_budget=8)  # longest 4 tokens: 2 rows each
    assert first.tokens.tolist() == [[1, 2, 3, 7], [4, 9, 10, 11]]
    assert second.tokens.tolist() == [[5, 6, 12, 0], [0, 0, 0, 0]]  # a filler row carries no target
    for mb in (first, second):
        assert mb.tokens[mb.rows, mb.cols + 1].tolist() == mb.targets.tolist()
    assert (first.span, second.span) == (slice(0, 4), slice(4, 5))  # rows of the step's columns
    assert seqs.span(1, 3) == slice(1, 5)
    # the second mini-batch's micro-batches start at its own first sequence
    (mb,) = seqs.micro_batches(2, 3, token_budget=8)
    assert mb.rows.tolist() == [0] and mb.targets.tolist() == [12]


def test_step_batch_is_token_major():
    step = StepBatch.build(
        [[1, 2], [3]],
        [[4, 5, 6], [7]],
        rollout_logp=[torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0])],
        advantages=torch.tensor([0.5, -0.5]),
        route_sdpo=torch.tensor([False, True]),
        has_teacher=torch.tensor([False, True]),
        fallback=torch.tensor([False, False]),
        teacher_prefixes={1: [8, 9, 10]},
        topk=2,
        pad_id=0,
    )
    assert step.advantage.tolist() == [0.5, 0.5, 0.5, -0.5]  # a rollout's value on each of its tokens
    assert step.route_sdpo.tolist() == [False, False, False, True]
    assert step.teacher.tokens.tolist() == [[8, 9, 10, 7]] and step.teacher_rows.tolist() == [3]
    assert step.teacher.target.tolist() == step.student.target[step.teacher_rows].tolist() == [7]
    assert step.topk_ids.shape == (4, 2) and step.teacher_topk_logp.shape == (4, 2)
    step.old_logp[1:3] = torch.tensor([-0.5, -0.25])  # a pass fills its span of a column
    x = step.loss_batch(slice(1, 4))
    assert x.old_logp.tolist() == [[-0.5], [-0.25], [0.0]]
    assert x.rollout_logp.tolist() == [[-2.0], [-3.0], [-4.0]]
    assert x.topk_ids.shape == (3, 1, 2) and x.advantages.tolist() == [0.5, 0.5, -0.5]
    assert x.old_logp.data_ptr() == step.old_logp[1:].data_ptr()  # a view, not a copy
    moved = step.to(torch.device("meta"))
    assert {t.device.type for t in (moved.old_logp, moved.student.tokens, moved.teacher.seq)} == {"meta"}
    no_teacher = StepBatch.build(
        [[1]],
        [[2]],
        rollout_logp=[torch.tensor([-1.0])],
        advantages=torch.tensor([1.0]),
        route_sdpo=torch.tensor([False]),
        has_teacher=torch.tensor([False]),
        fallback=torch.tensor([True]),
        teacher_prefixes={},
        topk=0,
        pad_id=0,
    )
    assert no_teacher.teacher is None and no_teacher.topk_ids is None and no_teacher.teacher_entropy is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="prefix"):
        Sequences.build([[]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match="2 prefixes but 1"):
        Sequences.build([[1], [2]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match=r"no sequences in \[1, 1\)"):
        Sequences.build([[1]], [[1]], pad_id=0).micro_batches(1, 1, token_budget=8)
    with pytest.raises(ValueError, match=r"sequences \[0, 2\) of 1"):
        Sequences.build([[1]], [[1]], pad_id=0).micro_batches(0, 2, token_budget=8)


def test_an_agreed_plan_gives_the_same_micro_batches_with_fillers():
    """Expert-parallel ranks plan for the longest sequence and the most sequences of any rank: a rank
    with fewer or shorter ones gets micro-batches of the same shape, filler ones (no target) last."""
    routes = [torch.full((n, 2, 1), i, dtype=torch.int16) for i, n in enumerate((3, 4))]
    seqs = Sequences.build([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0, routes=routes)
    mbs = seqs.micro_batches(0, 2, token_budget=12, longest=6, count=5)  # 2 rows of 6: 3 micro-batches
    assert [tuple(m.tokens.shape) for m in mbs] == [(2, 6)] * 3
    assert mbs[0].tokens.tolist() == [[1, 2, 4, 0, 0, 0], [3, 5, 6, 7, 0, 0]]
    assert (
        mbs[0].routes.shape == (2, 6, 2, 1)
        and mbs[0].routes[1, :4].eq(1).all()
        and mbs[0].routes[:, 4:].eq(-1).all()
    )
    for filler in mbs[1:]:
        assert filler.tokens.eq(0).all() and filler.targets.numel() == 0 and filler.routes.eq(-1).all()
        assert filler.span == slice(4, 4) and filler.seqs == slice(2, 2)
    (none,) = Sequences.empty(pad_id=7, device=torch.device("cpu")).micro_batches(
        0, 0, token_budget=8, longest=3, count=1
    )
    assert none.tokens.tolist() == [[7, 7, 7]] and none.targets.numel() == 0 and none.routes is None
