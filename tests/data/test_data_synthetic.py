from collections import Counter

from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.synthetic import DATA_SOURCE, WORDS, make_synthetic_rows
from srpo_megatron.data.templating import encode_prompt
from srpo_megatron.rewards import get_reward_fn
from tools.make_synthetic_data import main as make_synthetic_data


def test_deterministic_by_seed_and_split():
    assert make_synthetic_rows(50, seed=1) == make_synthetic_rows(50, seed=1)
    assert make_synthetic_rows(50, seed=1) != make_synthetic_rows(50, seed=2)
    assert make_synthetic_rows(50, seed=1, split="train") != make_synthetic_rows(50, seed=1, split="test")


def test_rule_is_the_marked_option_and_answers_are_balanced():
    rows = make_synthetic_rows(400, seed=0)
    for row in rows:
        lines = row.messages[-1]["content"].split("\n")
        marked = [line for line in lines if line.endswith(" *")]
        assert len(lines) == 4 and len(marked) == 1
        assert marked[0][0] == row.ground_truth
    counts = Counter(row.ground_truth for row in rows)
    assert set(counts) == set("ABCD") and min(counts.values()) > 70


def test_scored_by_the_science_verifier():
    row = make_synthetic_rows(1, seed=0)[0]
    reward = get_reward_fn(row.data_source)
    assert row.data_source == DATA_SOURCE
    assert reward(f"<answer>{row.ground_truth}</answer>", row.ground_truth).score == 1.0


def test_prompts_are_short_and_words_single_tokens(tokenizer):
    assert all(len(tokenizer.encode(" " + w)) == 1 for w in WORDS)
    lengths = {len(encode_prompt(tokenizer, row.messages)) for row in make_synthetic_rows(40, seed=0)}
    assert max(lengths) < 60


def test_cli_writes_rows(tmp_path, capsys):
    make_synthetic_data(["--out-dir", str(tmp_path), "--seed", "3", "--num-train", "20", "--num-test", "5"])
    assert load_rows(tmp_path / "train.parquet") == make_synthetic_rows(20, 3, "train")
    assert len(load_rows(tmp_path / "test.parquet")) == 5
    assert '"train": 20' in capsys.readouterr().out.splitlines()[-1]
