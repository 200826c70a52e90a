import json

import pytest

from srpo_megatron.data.rows import PromptRow, load_rows, parse_row, save_rows
from srpo_megatron.errors import UserError
from srpo_megatron.rewards import get_reward_fn

SDPO_SCIENCE = {
    "idx": 96,
    "kind": "mcq",
    "dataset": "sciknoweval",
    "answer": "B",
    "elo": 1500,
    "prompt": "What is q?\n\nA: 50 pC\nB: 56 pC\nC: 60 pC\nD: 64 pC\nPlease reason step by step.",
    "description": "What is q?",
    "tests": "-",
    "embedding": [],
    "system": "\nGiven a question and four options, please select the right answer.\n",
}
SDPO_TOOL = {
    **SDPO_SCIENCE,
    "kind": "tooluse",
    "dataset": "tooluse",
    "answer": '[{"Action": "a", "Action_Input": "{}"}]',
}
VERL = {
    "data_source": "sciknoweval",
    "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
    "reward_model": {"style": "rule", "ground_truth": "C"},
    "extra_info": {"split": "train", "index": 3},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sdpo_raw_rows():
    row = parse_row(SDPO_SCIENCE)
    assert row.data_source == "sciknoweval" and row.ground_truth == "B"
    assert [m["role"] for m in row.messages] == ["system", "user"]
    assert row.messages[1]["content"].endswith("Please reason step by step.")
    assert row.extra == {"index": 96, "kind": "mcq"}
    # "None" (the string) and null both mean: no system message.
    for system in ("None", None):
        row = parse_row({**SDPO_TOOL, "system": system})
        assert [m["role"] for m in row.messages] == ["user"]


def test_verl_rows():
    row = parse_row(VERL)
    assert row == PromptRow("sciknoweval", VERL["prompt"], "C", {"split": "train", "index": 3})
    assert row.to_verl() == VERL


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({**VERL, "prompt": "just text"}, "'prompt'"),
        (
            {**VERL, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "'prompt'",
        ),
        ({**VERL, "prompt": [{"role": "robot", "content": "q"}]}, "'prompt'"),
        ({**VERL, "reward_model": {"style": "rule"}}, "'ground_truth'"),
        ({**VERL, "reward_model": None}, "'reward_model'"),
        ({**VERL, "data_source": ""}, "'data_source'"),
        ({**VERL, "extra_info": [1]}, "'extra_info'"),
        ({**SDPO_SCIENCE, "answer": None}, "'answer'"),
        ({**SDPO_SCIENCE, "system": 5}, "'system'"),
        ({k: v for k, v in SDPO_SCIENCE.items() if k != "prompt"}, "'prompt'"),
        ({"question": "?"}, "data_source"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "train.jsonl", [VERL, SDPO_SCIENCE, record])
    with pytest.raises(ValueError) as err:
        load_rows(path)
    message = str(err.value)
    assert str(path) in message and "row 3" in message and field in message


def test_invalid_json_line_and_bad_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(VERL) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"x.jsonl, row 3: not valid JSON"):
        load_rows(path)
    with pytest.raises(ValueError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        load_rows(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_round_trip_and_mixed_forms(tmp_path, suffix):
    rows = load_rows(write_jsonl(tmp_path / "raw.json", [SDPO_SCIENCE, SDPO_TOOL, VERL]))
    assert [r.data_source for r in rows] == ["sciknoweval", "tooluse", "sciknoweval"]
    save_rows(rows, tmp_path / f"out{suffix}")
    assert load_rows(tmp_path / f"out{suffix}") == rows


def test_parquet_without_extra_and_json_array(tmp_path):
    rows = [PromptRow("tooluse", [{"role": "user", "content": "u"}], "[]")]
    save_rows(rows, tmp_path / "a.parquet")
    assert load_rows(tmp_path / "a.parquet") == rows
    (tmp_path / "b.json").write_text(json.dumps([VERL, VERL]))
    assert len(load_rows(tmp_path / "b.json")) == 2


def test_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps(VERL).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"q"', b'"q\xff"') + b"\n")
    column = good.index(b'"q"') + 3
    with pytest.raises(
        UserError, match=rf"train.jsonl, line 2: not UTF-8 text \(byte 0xff at column {column}\)"
    ):
        load_rows(path)


def test_empty_user_message_is_refused(tmp_path):
    record = {**VERL, "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": " "}]}
    with pytest.raises(UserError, match="row 1: field 'prompt' message 1 is an empty user message"):
        load_rows(write_jsonl(tmp_path / "train.jsonl", [record]))


def test_row_check_errors_name_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [VERL, {**VERL, "data_source": "chemistyr"}])
    with pytest.raises(UserError, match="train.jsonl, row 2: no reward function for data_source 'chemistyr'"):
        load_rows(path, check=lambda row: get_reward_fn(row.data_source))
