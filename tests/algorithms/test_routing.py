import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_megatron.algorithms.advantages import compute_group_advantages
from srpo_megatron.algorithms.config import AlgorithmConfig
from srpo_megatron.algorithms.routing import route_rollouts, select_siblings

GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_lone_correct_rollout_goes_to_grpo():
    # group 0: only rollout 1 is correct -> it has no teacher (never itself) -> GRPO;
    # rollouts 0, 2, 3 are wrong with sibling 1 -> SDPO.
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0])
    r = route_rollouts(rewards, GROUPS[:4], AlgorithmConfig(variant="srpo"))
    assert r.correct.tolist() == [False, True, False, False]
    assert r.sibling.tolist() == [1, -1, 1, 1]
    assert r.route_sdpo.tolist() == [True, False, True, True]
    assert r.needs_teacher.tolist() == [True, False, True, True]
    assert r.fallback.tolist() == [False] * 4


def test_all_wrong_group_falls_back_to_grpo_with_zero_advantage():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    r = route_rollouts(rewards, GROUPS, AlgorithmConfig(variant="srpo"))
    assert r.route_sdpo[:4].tolist() == [False] * 4  # group 0: GRPO fallback
    assert r.fallback.tolist() == [True] * 4 + [False] * 4
    assert r.sibling[:4].tolist() == [-1] * 4
    adv = compute_group_advantages(rewards, GROUPS)
    assert adv[:4].tolist() == [0.0] * 4
    # group 1: correct 4 and 6 teach each other; wrong 5 and 7 use the first correct, 4
    assert r.sibling[4:].tolist() == [6, 4, 4, 4]
    assert r.route_sdpo[4:].tolist() == [False, True, False, True]


def test_correct_rollout_with_correct_siblings_srpo_vs_sdpo():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    groups = GROUPS[:4]
    srpo = route_rollouts(rewards, groups, AlgorithmConfig(variant="srpo"))
    sdpo = route_rollouts(rewards, groups, AlgorithmConfig(variant="sdpo"))
    assert srpo.has_teacher.tolist() == [True] * 4
    assert srpo.route_sdpo.tolist() == [False, False, True, True]  # correct -> GRPO under srpo
    assert sdpo.route_sdpo.tolist() == [True, True, True, True]  # ... and -> SDPO under sdpo
    assert sdpo.needs_teacher.tolist() == [True] * 4


def test_sdpo_drops_rollouts_without_a_sibling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the lone correct one has no teacher
    r = route_rollouts(rewards, GROUPS[:4], AlgorithmConfig(variant="sdpo"))
    assert r.route_sdpo.tolist() == [False, True, True, True]


@pytest.mark.parametrize("variant", ["grpo", "advantage_mix"])
def test_variants_without_sdpo_branch(variant):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    r = route_rollouts(rewards, GROUPS[:4], AlgorithmConfig(variant=variant))
    assert not r.route_sdpo.any()
    expected_teacher = [True] * 4 if variant == "advantage_mix" else [False] * 4
    assert r.needs_teacher.tolist() == expected_teacher


def test_success_threshold():
    r = route_rollouts(torch.tensor([0.49, 0.5, 0.7]), torch.zeros(3, dtype=torch.long), AlgorithmConfig())
    assert r.correct.tolist() == [False, True, True]


def test_random_sibling_is_seeded_and_valid():
    correct = torch.tensor([True, True, True, False, False, True, False, False])
    picks = [select_siblings(correct, GROUPS, "random", torch.Generator().manual_seed(s)) for s in range(20)]
    again = select_siblings(correct, GROUPS, "random", torch.Generator().manual_seed(3))
    assert torch.equal(picks[3], again)
    assert {int(p[3]) for p in picks} == {0, 1, 2}  # wrong rollout 3 sees all three correct siblings
    for p in picks:
        assert p[5].item() == -1  # lone correct in group 1: never itself
        assert p[0].item() in (1, 2)


def test_random_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        select_siblings(torch.tensor([True, True]), torch.tensor([0, 0]), "random")
    with pytest.raises(ValueError, match="first"):
        select_siblings(torch.tensor([True, True]), torch.tensor([0, 0]), "best")


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=24),
    mode=st.sampled_from(["first", "random"]),
)
def test_sibling_invariants(data, mode):
    groups = torch.tensor([g for g, _ in data])
    correct = torch.tensor([c for _, c in data])
    sibling = select_siblings(correct, groups, mode, torch.Generator().manual_seed(0))
    for i, j in enumerate(sibling.tolist()):
        others = [k for k in range(len(data)) if k != i and groups[k] == groups[i] and correct[k]]
        if not others:
            assert j == -1
        else:
            assert j in others  # same group, correct, never itself
            if mode == "first":
                assert j == others[0]
