"""Prompt rows: one internal type, read from either on-disk form of ALGORITHM.md sec. 10.

- verl-style (what SDPO's preprocessing writes; parquet or JSON lines): `data_source`, `prompt`
  (a list of {role, content} messages), `reward_model` ({style, ground_truth}), `extra_info`.
- SDPO's raw JSON lines (`datasets/sciknoweval/<domain>/{train,test}.json`,
  `datasets/tooluse/{train,test}.json`): `idx`, `kind`, `dataset` (-> data_source), `answer`
  (-> ground truth), `prompt` (the user message), `system` (text, or null / "None" for none), and
  unused `description`, `elo`, `tests`, `embedding`.
Every row is validated; a bad one raises UserError naming the file, the 1-based row (the line
number in a JSON-lines file) and the field.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srpo_megatron.errors import UserError

_ROLES = ("system", "user", "assistant")


@dataclass
class PromptRow:
    """One prompt. data_source selects the reward (rewards.get_reward_fn); messages are chat
    messages {"role", "content"} ending with the user turn; ground_truth is what the verifier
    compares against (a letter, or the tool-use JSON list as a string); extra is free metadata."""

    data_source: str
    messages: list[dict[str, str]]
    ground_truth: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_verl(self) -> dict[str, Any]:
        """The verl-style record (`reward_model.style` is "rule", as verl's examples write it)."""
        return {
            "data_source": self.data_source,
            "prompt": [dict(m) for m in self.messages],
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
            "extra_info": dict(self.extra),
        }


def _require_str(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r:.80}")
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field 'prompt' must be a non-empty list of messages, got {messages!r:.80}")
    checked = []
    for pos, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"field 'prompt' message {pos} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"field 'prompt' message {pos} needs role in {_ROLES} and string content")
        if role == "user" and not content.strip():
            raise ValueError(f"field 'prompt' message {pos} is an empty user message")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise ValueError("field 'prompt' must end with a user message")
    return checked


def parse_row(record: Any) -> PromptRow:
    """Normalise one verl-style or SDPO-raw record; ValueError (naming the field) if invalid."""
    if not isinstance(record, dict):
        raise ValueError(f"a row must be a JSON object, got {type(record).__name__}")
    if "data_source" in record:
        reward_model = record.get("reward_model")
        if not isinstance(reward_model, dict):
            raise ValueError("field 'reward_model' must be an object with 'ground_truth'")
        extra = record.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise ValueError("field 'extra_info' must be an object")
        return PromptRow(
            data_source=_require_str(record, "data_source"),
            messages=_check_messages(record.get("prompt")),
            ground_truth=_require_str(reward_model, "ground_truth"),
            # parquet stores extra_info as one struct for all rows: keys another row has come back
            # as null here, so nulls are dropped
            extra={k: v for k, v in extra.items() if v is not None},
        )
    if "dataset" in record:
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"field 'system' must be a string or null, got {system!r:.80}")
        messages = [] if system in (None, "None", "") else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": _require_str(record, "prompt")})
        extra = {"index": record.get("idx"), "kind": record.get("kind")}
        return PromptRow(
            data_source=_require_str(record, "dataset"),
            messages=messages,
            ground_truth=_require_str(record, "answer"),
            extra={k: v for k, v in extra.items() if v is not None},
        )
    raise ValueError("neither a verl-style row (no 'data_source') nor an SDPO row (no 'dataset')")


def read_records(path: Path):
    """Yield (row number, record) pairs; row numbers are 1-based (JSON lines: the line number)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1  # the row, in a JSON-lines file
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column})"
        ) from None
    if text.lstrip().startswith("["):  # one JSON array instead of JSON lines
        try:
            records = json.loads(text)
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON: {err}") from None
        yield from enumerate(records, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}, row {number}: not valid JSON: {err}") from None


def load_rows(path: str | Path, check: Callable[[PromptRow], object] | None = None) -> list[PromptRow]:
    """All rows of one .parquet, .jsonl or .json (JSON lines or a JSON array) file.

    ``check(row)``, if given, runs on every row; a ValueError it raises (e.g. the reward registry's
    for an unknown data_source) is reported with the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise UserError(f"{path}: unsupported data file type {path.suffix!r} (use .parquet, .jsonl or .json)")
    rows = []
    for number, record in read_records(path):
        try:
            row = parse_row(record)
            if check is not None:
                check(row)
        except ValueError as err:
            raise UserError(f"{path}, row {number}: {err}") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def save_rows(rows: list[PromptRow], path: str | Path) -> None:
    """Write verl-style rows as .parquet or JSON lines (.jsonl / .json), by the file suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [row.to_verl() for row in rows]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not any(record["extra_info"] for record in records):
            for record in records:  # parquet cannot hold a struct with no fields; reads back as {}
                del record["extra_info"]
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix in (".jsonl", ".json"):
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise ValueError(
            f"{path}: unsupported data file type {path.suffix!r} (use .parquet, .jsonl or .json)"
        )
