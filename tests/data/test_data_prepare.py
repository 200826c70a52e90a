import json

import pyarrow.parquet as pq
import pytest

from srpo_megatron.data.prompts import SCIENCE_SYSTEM_PROMPT, TOOL_USE_SYSTEM_PROMPT
from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import render_prompt
from srpo_megatron.rewards import get_reward_fn
from tools.prepare_data import main as prepare_data


def science_record(i, domain="Physics", level="L3", kind="mcq-4-choices"):
    return {
        "question": f"Question {i}?",
        "choices": {"label": ["A", "B", "C", "D"], "text": ["1 J", "2 J", "3 J", "4 J"]},
        "answerKey": "ABCD"[i % 4],
        "domain": domain,
        "details": {"level": level, "task": "t"},
        "type": kind,
    }


def test_sciknoweval(tmp_path, tokenizer, capsys):
    records = [science_record(i) for i in range(40)]
    records += [
        science_record(0, domain="Chemistry"),
        science_record(1, level="L2"),
        science_record(2, kind="open-ended-qa"),
    ]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = prepare_data(
        ["sciknoweval", "--input", str(raw), "--domain", "physics", "--out-dir", str(tmp_path / "out")]
    )
    assert (counts["rows"], counts["train"], counts["test"]) == (40, 36, 4)
    assert sum(counts["skipped"].values()) == 3
    assert "train 36 / test 4" in capsys.readouterr().out

    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert table.column_names == ["data_source", "prompt", "reward_model", "extra_info"]
    train, test = load_rows(tmp_path / "out" / "train.parquet"), load_rows(tmp_path / "out" / "test.parquet")
    assert {r.extra["source_index"] for r in train + test} == set(range(1, 41))
    row = train[0]
    assert row.messages[0] == {"role": "system", "content": SCIENCE_SYSTEM_PROMPT}
    assert row.messages[1]["content"].endswith("\nD: 4 J\nPlease reason step by step.")
    assert render_prompt(tokenizer, row.messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (
        get_reward_fn(row.data_source)(f"<answer>{row.ground_truth}</answer>", row.ground_truth).score == 1.0
    )

    # The split is fixed by the seed (42): a second run gives the same files.
    prepare_data(
        ["sciknoweval", "--input", str(raw), "--domain", "Physics", "--out-dir", str(tmp_path / "again")]
    )
    assert load_rows(tmp_path / "again" / "test.parquet") == test


def tool_record(name, num_instances):
    return {
        "Name": name,
        "Description": f"{name} API",
        "NLDocumentation": 'getThing: Get a thing.\nParameters: {"id": "integer. The id."}\nOutput: A thing.',
        "Instances": [
            {
                "input": f"Get thing {i}",
                "intermediate_steps": [[["getThing", json.dumps({"id": i}), "I should get it."], "ok"]]
                * (1 + i % 2),
                "output": "done",
            }
            for i in range(num_instances)
        ]
        + [{"input": "hello", "intermediate_steps": [], "output": "hi"}],
    }


def test_toolalpaca(tmp_path, tokenizer):
    raw = tmp_path / "tools.json"
    raw.write_text(json.dumps([tool_record("Things", 12), tool_record("Stuff", 8)]))
    out = tmp_path / "out"
    counts = prepare_data(["toolalpaca", "--input", str(raw), "--out-dir", str(out), "--format", "jsonl"])
    assert (counts["rows"], counts["train"], counts["test"]) == (20, 18, 2)
    assert counts["skipped"] == {"instance without tool calls": 2}
    rows = load_rows(out / "train.jsonl") + load_rows(out / "test.jsonl")
    row = rows[0]
    assert row.data_source == "tooluse"
    assert row.messages[0] == {"role": "system", "content": TOOL_USE_SYSTEM_PROMPT}
    user = row.messages[1]["content"]
    assert user.startswith("Your task is to answer the user's question using available tools.")
    assert "Name: " in user and "Begin!\nQuestion: Get thing" in user
    assert "<|im_start|>user\nYour task" in render_prompt(tokenizer, row.messages)
    calls = json.loads(row.ground_truth)
    response = "\n".join(
        f"Thought: go\nAction: {c['Action']}\nAction Input: {c['Action_Input']}" for c in calls
    )
    assert get_reward_fn("tooluse")(response, row.ground_truth).score == 1.0

    prepare_data(["toolalpaca", "--input", str(raw), "--out-dir", str(out), "--tool-system-prompt", "none"])
    assert load_rows(out / "train.parquet")[0].messages[0]["role"] == "user"


def sdpo_row(i, dataset="sciknoweval"):
    return {"idx": i, "kind": "mcq", "dataset": dataset, "answer": "A", "prompt": f"Q{i}?", "system": "None"}


@pytest.mark.parametrize("kind", ["sciknoweval", "toolalpaca"])
def test_sdpo_split_files_load_directly(tmp_path, kind):
    split = tmp_path / "train.json"
    split.write_text("".join(json.dumps(sdpo_row(i)) + "\n" for i in range(5)))
    args = [kind, "--input", str(split), "--out-dir", str(tmp_path / "out"), "--domain", "Chemistry"]
    with pytest.raises(SystemExit) as exit_:
        prepare_data(args)
    message = str(exit_.value.code)
    assert message == (
        f"{split}: 5 prompt rows in SDPO's form (data_source sciknoweval) that the trainer loads directly, "
        f"no conversion needed: data.train_files=[{split}] (or data.test_files=[...])"
    )
    assert not (tmp_path / "out").exists()

    rows = [sdpo_row(i) for i in range(5)]
    del rows[2]["answer"]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=rf"^prepare_data: {split}, row 3: missing field 'answer'$"):
        prepare_data(args)


@pytest.mark.parametrize(
    ("kind", "records", "error"),
    [
        ("toolalpaca", [tool_record("A", 1), {"Description": "d"}], r"row 2: missing field 'Name'$"),
        ("toolalpaca", [{**tool_record("A", 1), "Instances": "none"}], r"row 1: field 'Instances' must be a list"),
        (
            "toolalpaca",
            [{**tool_record("A", 1), "Instances": [{"input": "x", "intermediate_steps": [[["getThing", "{id: 1}", "t"], "ok"]]}]}],
            r"row 1, Instances\[0\], intermediate_steps\[0\]: the action input is not JSON",
        ),
        (
            "toolalpaca",
            [{**tool_record("A", 1), "Instances": [{"input": "x", "intermediate_steps": [["getThing"]]}]}],
            r"row 1, Instances\[0\], intermediate_steps\[0\]: expected \[\[action, action_input, thought\], observation\]",
        ),
        ("toolalpaca", [{**tool_record("A", 1), "Instances": [{"intermediate_steps": [[["a", "{}", "t"], "o"]]}]}], r"row 1, Instances\[0\]: missing field 'input'"),
        ("sciknoweval", [science_record(0), {k: v for k, v in science_record(1).items() if k != "question"}], r"row 2: missing field 'question'$"),
        ("sciknoweval", [science_record(0), {**science_record(1), "answerKey": "E"}], r"row 2: field 'answerKey' 'E' is not one of the labels"),
        ("sciknoweval", [science_record(0), ["not", "a", "record"]], r"row 2: a record must be a JSON object, got list"),
    ],
)  # fmt: skip
def test_bad_records_name_the_file_row_and_field(tmp_path, kind, records, error):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit, match=rf"^prepare_data: {raw}, {error}"):
        prepare_data([kind, "--input", str(raw), "--out-dir", str(tmp_path / "out"), "--domain", "Physics"])


def test_bad_json_names_the_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(science_record(0)) + "\n{not json\n")
    with pytest.raises(SystemExit, match=rf"^prepare_data: {raw}, row 2: not valid JSON"):
        prepare_data(
            ["sciknoweval", "--input", str(raw), "--out-dir", str(tmp_path / "out"), "--domain", "Physics"]
        )
