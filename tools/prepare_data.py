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
"""

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from srpo_megatron.data.prompts import (
    SCIENCE_SYSTEM_PROMPT,
    SCIENCE_USER_SUFFIX,
    TOOL_USE_SYSTEM_PROMPT,
    TOOL_USE_USER_TEMPLATE,
)
from srpo_megatron.data.rows import PromptRow, save_rows


def read_records(path: Path) -> list[dict]:
    """A JSON array or JSON lines."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def science_rows(records: list[dict], domain: str, any_mcq: bool, skipped: Counter) -> list[PromptRow]:
    rows = []
    for number, record in enumerate(records, start=1):
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
        choices = record.get("choices") or {}
        labels, texts = choices.get("label"), choices.get("text")
        if (
            not labels
            or not isinstance(labels, list)
            or not isinstance(texts, list)
            or len(labels) != len(texts)
        ):
            raise ValueError(f"record {number}: 'choices' needs equal-length 'label' and 'text' lists")
        answer = record.get("answerKey")
        if answer not in labels:
            raise ValueError(f"record {number}: answerKey {answer!r} is not one of the labels {labels}")
        options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts, strict=True))
        question = f"{record['question']}\n\n{options}{SCIENCE_USER_SUFFIX}"
        messages = [
            {"role": "system", "content": SCIENCE_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        rows.append(
            PromptRow("sciknoweval", messages, answer, {"domain": domain.lower(), "source_index": number})
        )
    return rows


def tool_use_rows(records: list[dict], system_prompt: str | None, skipped: Counter) -> list[PromptRow]:
    rows = []
    for number, tool in enumerate(records, start=1):
        for key in ("Name", "Description", "NLDocumentation", "Instances"):
            if key not in tool:
                raise ValueError(f"tool record {number}: missing field {key!r}")
        for instance in tool["Instances"]:
            steps = instance.get("intermediate_steps") or []
            if not steps:
                skipped["instance without tool calls"] += 1
                continue
            calls = []
            for step in steps:
                action, action_input = step[0][0], step[0][1]
                json.loads(action_input or "{}")  # the verifier needs gold inputs that parse
                calls.append({"Action": action, "Action_Input": action_input or "{}"})
            user = TOOL_USE_USER_TEMPLATE.format(
                name=tool["Name"],
                description=tool["Description"],
                documentation=tool["NLDocumentation"].strip(),
                question=instance["input"],
            )
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": user}
            ]
            rows.append(PromptRow("tooluse", messages, json.dumps(calls), {"tool": tool["Name"]}))
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

    records = [record for path in args.input for record in read_records(path)]
    skipped: Counter = Counter()
    if args.kind == "sciknoweval":
        if not args.domain:
            parser.error("sciknoweval needs --domain")
        rows = science_rows(records, args.domain, args.any_mcq, skipped)
    else:
        system = {"default": TOOL_USE_SYSTEM_PROMPT, "none": None}.get(args.tool_system_prompt)
        if args.tool_system_prompt not in ("default", "none"):
            system = Path(args.tool_system_prompt).read_text(encoding="utf-8")
        rows = tool_use_rows(records, system, skipped)
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
