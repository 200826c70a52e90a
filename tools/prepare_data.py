"""Convert raw SciKnowEval and ToolAlpaca-style records into verl-style prompt rows.

    python tools/prepare_data.py sciknoweval --input raw.jsonl --domain Physics --out-dir data/physics
    python tools/prepare_data.py toolalpaca --input tools.json --out-dir data/tooluse

Writes {train,test}.{parquet|jsonl} (columns: data_source, prompt, reward_model, extra_info; see
srpo_megatron/data/rows.py), split 90/10 after a seed-42 shuffle, and prints the counts.

SciKnowEval record (the HF dataset hicai-zju/SciKnowEval): question, choices {label: [...],
text: [...]}, answerKey, domain, details {level}, type. Kept: details.level == "L3", type ==
"mcq-4-choices" (any type starting with "mcq" with --any-mcq), domain == --domain.
Prompt = SDPO's science system prompt + "question\\n\\nA: ...\\nB: ...\\nPlease reason step by step.";
data_source "sciknoweval", ground truth the answer letter.

ToolAlpaca-style record (one tool, one or more user requests), the layout of ToolAlpaca's
train_data.json: Name, Description, NLDocumentation (the function list as text), Instances
[{input, intermediate_steps: [[[action, action_input, thought], observation], ...]}].
One row per instance; ground truth = JSON list of {"Action", "Action_Input"} from its steps;
instances without steps are skipped (counted). data_source "tooluse".

SDPO's released split files (datasets/sciknoweval/<domain>/{train,test}.json, datasets/tooluse/
{train,test}.json) and verl-style rows are already prompt rows: the trainer reads them as they are
(data.train_files=[...]), and this tool says so in one line instead of converting them. A bad
record is an error naming its file, row and field.
"""

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from srpo_megatron.data.prompts import (
    SCIENCE_SYSTEM_PROMPT,
    SCIENCE_USER_SUFFIX,
    TOOL_USE_SYSTEM_PROMPT,
    TOOL_USE_USER_TEMPLATE,
)
from srpo_megatron.data.rows import PromptRow, load_rows, read_records, save_rows


def read_inputs(paths: list[Path]) -> list[tuple[str, Any]]:
    """(where, record) of every record: a JSON array or JSON lines; where = "file, row N" (1-based,
    the line number in JSON lines), for messages."""
    return [(f"{path}, row {number}", record) for path in paths for number, record in read_records(path)]


def prompt_row_files(paths: list[Path], records: list[tuple[str, Any]]) -> str | None:
    """The one-line answer when the inputs are already prompt rows (SDPO's released splits, or verl
    form), which the trainer loads as they are; None for raw records. Every row is checked, so a bad
    one is an error naming its file, row and field."""
    first = records[0][1] if records else None
    if not isinstance(first, dict) or not ({"dataset", "data_source"} & first.keys()):
        return None
    rows = [row for path in paths for row in load_rows(path)]
    form = "SDPO's" if "dataset" in first else "verl"
    sources = ", ".join(sorted({row.data_source for row in rows}))
    files = ",".join(map(str, paths))
    return (
        f"{files}: {len(rows)} prompt rows in {form} form (data_source {sources}) that the trainer loads "
        f"directly, no conversion needed: data.train_files=[{files}] (or data.test_files=[...])"
    )


def _field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], kind):
        raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {record[key]!r:.80}")
    return record[key]


def science_rows(
    records: list[tuple[str, Any]], domain: str, any_mcq: bool, skipped: Counter
) -> list[PromptRow]:
    rows = []
    for number, (where, record) in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        if str(record.get("domain", "")).lower() != domain.lower():
            skipped["other domain"] += 1
            continue
        if (record.get("details") or {}).get("level") != "L3":
            skipped["not level L3"] += 1
            continue
        kind = str(record.get("type", ""))
        if not (kind.startswith("mcq") if any_mcq else kind == "mcq-4-choices"):
            skipped[f"type {kind!r}"] += 1
            continue
        choices = _field(record, "choices", dict, where)
        labels, texts = choices.get("label"), choices.get("text")
        if (
            not labels
            or not isinstance(labels, list)
            or not isinstance(texts, list)
            or len(labels) != len(texts)
        ):
            raise ValueError(f"{where}: field 'choices' needs equal-length 'label' and 'text' lists")
        answer = record.get("answerKey")
        if answer not in labels:
            raise ValueError(f"{where}: field 'answerKey' {answer!r} is not one of the labels {labels}")
        options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts, strict=True))
        question = f"{_field(record, 'question', str, where)}\n\n{options}{SCIENCE_USER_SUFFIX}"
        messages = [
            {"role": "system", "content": SCIENCE_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        rows.append(
            PromptRow("sciknoweval", messages, answer, {"domain": domain.lower(), "source_index": number})
        )
    return rows


def _tool_calls(steps: Any, where: str) -> list[dict[str, str]]:
    """The gold calls of one instance: intermediate_steps = [[[action, action_input, thought], observation], ...]."""
    if not isinstance(steps, list):
        raise ValueError(f"{where}: field 'intermediate_steps' must be a list, got {steps!r:.80}")
    calls = []
    for j, step in enumerate(steps):
        at = f"{where}, intermediate_steps[{j}]"
        if not (isinstance(step, list) and step and isinstance(step[0], list) and len(step[0]) >= 2):
            raise ValueError(
                f"{at}: expected [[action, action_input, thought], observation], got {step!r:.80}"
            )
        action, action_input = step[0][0], step[0][1] or "{}"
        if not isinstance(action, str) or not isinstance(action_input, str):
            raise ValueError(f"{at}: action and action input must be strings, got {step[0]!r:.80}")
        try:
            json.loads(action_input)  # the verifier needs gold inputs that parse
        except ValueError as err:
            raise ValueError(f"{at}: the action input is not JSON ({err}): {action_input!r:.80}") from None
        calls.append({"Action": action, "Action_Input": action_input})
    return calls


def tool_use_rows(
    records: list[tuple[str, Any]], system_prompt: str | None, skipped: Counter
) -> list[PromptRow]:
    rows = []
    for where, tool in records:
        if not isinstance(tool, dict):
            raise ValueError(f"{where}: a tool record must be a JSON object, got {type(tool).__name__}")
        name = _field(tool, "Name", str, where)
        description = _field(tool, "Description", str, where)
        documentation = _field(tool, "NLDocumentation", str, where)
        for k, instance in enumerate(_field(tool, "Instances", list, where)):
            at = f"{where}, Instances[{k}]"
            if not isinstance(instance, dict):
                raise ValueError(f"{at}: an instance must be a JSON object, got {type(instance).__name__}")
            calls = _tool_calls(instance.get("intermediate_steps") or [], at)
            if not calls:
                skipped["instance without tool calls"] += 1
                continue
            user = TOOL_USE_USER_TEMPLATE.format(
                name=name,
                description=description,
                documentation=documentation.strip(),
                question=_field(instance, "input", str, at),
            )
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": user}
            ]
            rows.append(PromptRow("tooluse", messages, json.dumps(calls), {"tool": name}))
    return rows


def split_rows(
    rows: list[PromptRow], seed: int, test_fraction: float
) -> tuple[list[PromptRow], list[PromptRow]]:
    """Shuffle with `seed`, then the first round(test_fraction * n) rows are the test split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_test = round(test_fraction * len(rows))
    test = [rows[i] for i in order[:num_test]]
    train = [rows[i] for i in order[num_test:]]
    for split, part in (("train", train), ("test", test)):
        for index, row in enumerate(part):
            row.extra = {**row.extra, "split": split, "index": index}
    return train, test


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sciknoweval", "toolalpaca"])
    parser.add_argument("--input", type=Path, required=True, nargs="+", help="raw JSON / JSON-lines files")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--domain", help="SciKnowEval domain to keep: Chemistry, Physics, Biology or Material"
    )
    parser.add_argument(
        "--any-mcq", action="store_true", help="keep every mcq-* type, not only mcq-4-choices"
    )
    parser.add_argument(
        "--tool-system-prompt",
        default="default",
        help="'default' (ours, see data/prompts.py), 'none' (as SDPO's released splits), or a file path",
    )
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)

    if args.kind == "sciknoweval" and not args.domain:
        parser.error("sciknoweval needs --domain")
    skipped: Counter = Counter()
    try:
        records = read_inputs(args.input)
        already = prompt_row_files(args.input, records)
        if already:
            sys.exit(already)
        if args.kind == "sciknoweval":
            rows = science_rows(records, args.domain, args.any_mcq, skipped)
        else:
            system = {"default": TOOL_USE_SYSTEM_PROMPT, "none": None}.get(args.tool_system_prompt)
            if args.tool_system_prompt not in ("default", "none"):
                system = Path(args.tool_system_prompt).read_text(encoding="utf-8")
            rows = tool_use_rows(records, system, skipped)
    except ValueError as err:  # a bad input file: its name, the row and the field, no traceback
        sys.exit(f"prepare_data: {err}")
    if not rows:
        sys.exit(f"no rows kept from {len(records)} records (skipped: {dict(skipped)})")
    train, test = split_rows(rows, args.seed, args.test_fraction)
    for split, part in (("train", train), ("test", test)):
        save_rows(part, args.out_dir / f"{split}.{args.format}")
    counts = {
        "records": len(records),
        "rows": len(rows),
        "train": len(train),
        "test": len(test),
        "skipped": dict(skipped),
    }
    print(f"{args.kind}: {len(records)} records -> {len(rows)} rows -> train {len(train)} / test {len(test)}")
    for reason, count in sorted(skipped.items()):
        print(f"  skipped {count}: {reason}")
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
