import pytest

from srpo_megatron.data.dataset import PromptDataset
from srpo_megatron.data.rows import PromptRow
from srpo_megatron.data.templating import TokenizedPrompt


def prompts(n):
    return [
        TokenizedPrompt(PromptRow("sciknoweval", [{"role": "user", "content": str(i)}], "A"), [i])
        for i in range(n)
    ]


def ids(batch):
    return [p.prompt_ids[0] for p in batch]


def test_epochs_are_permutations_and_batches_never_span_epochs():
    ds = PromptDataset(prompts(10), batch_size=4, seed=1)
    first = [ids(ds.next_batch()) for _ in range(2)]
    assert ds.epoch == 0 and len(set(sum(first, []))) == 8
    third = ids(ds.next_batch())
    assert ds.epoch == 1 and ds.index == 4 and len(set(third)) == 4


def test_same_seed_same_order_other_seed_differs():
    def take(seed):
        ds = PromptDataset(prompts(50), batch_size=5, seed=seed)
        return [ids(ds.next_batch()) for _ in range(25)]

    assert take(3) == take(3)
    assert take(3) != take(4)


def test_resume_sees_exactly_the_same_batches():
    ds = PromptDataset(prompts(23), batch_size=4, seed=7)
    for _ in range(7):
        ds.next_batch()
    state = ds.state_dict()
    expected = [ids(ds.next_batch()) for _ in range(12)]
    resumed = PromptDataset(prompts(23), batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_batch()) for _ in range(12)] == expected


def test_resume_refuses_changed_data():
    state = PromptDataset(prompts(23), batch_size=4, seed=7).state_dict()
    with pytest.raises(ValueError, match="num_prompts"):
        PromptDataset(prompts(24), batch_size=4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptDataset(prompts(23), batch_size=4, seed=8).load_state_dict(state)


def test_no_shuffle_and_bad_sizes():
    ds = PromptDataset(prompts(6), batch_size=3, seed=0, shuffle=False)
    assert ids(ds.next_batch()) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot fill"):
        PromptDataset(prompts(2), batch_size=3, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataset(prompts(2), batch_size=0, seed=0)
