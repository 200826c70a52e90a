"""Tool-use verifier (ToolAlpaca-derived, SDPO's protocol; ALGORITHM.md sec. 8).

gold: a JSON list of {"Action": name, "Action_Input": json-string}.
prediction: every `Action: <name>` (the name is a run of word characters) and every
`Action Input: {...}` object, the objects merged into one dict (later keys override).
reward = 1.0 iff Counter(predicted names) == Counter(gold names)
               AND merged predicted inputs == merged gold inputs, else 0.0.

Two parsers for the `Action Input` objects:
- "balanced" (default): the complete JSON object starting at the `{` (json's raw_decode), so
  nested objects parse; values compare with their JSON types (1 != 1.0 != true, "5" != 5).
- "reference": the SDPO reference exactly: the non-greedy `{.*?}` block up to the FIRST `}`
  (an input holding a nested object can never be correct: 2 of the 68 test items) and Python
  `==` (so 1 == 1.0 == True). Use it to reproduce published numbers.

Hostile text: every scan is a left-to-right search that never revisits text it has consumed,
and json decoding stops at the first invalid character (see `decode_object_at` for the one
trap). Python's json decoder reads dense JSON (`[1,1,1,...`) at only ~10 MB/s, so the characters
it may read per response are capped (MAX_DECODED_CHARS) as well as the blocks; either cap scores
0. Reasons quote parsed inputs through `reprlib` (a 5M-element list is not repr'd in full).
Deeply nested JSON (RecursionError) and oversized numbers (ValueError) count as unparsable.

The answer is parsed (``RewardResult.parsed``, the format rate) iff the response names a tool
call (`Action: <name>`; or none, against a gold with no call), unless the verifier gave up on its
`Action Input` blocks (the caps). An input that is not a JSON object is a wrong answer, not a lost
format.
"""

import json
import re
import reprlib
from collections import Counter
from typing import Any, Literal

from srpo_megatron.rewards.result import RewardResult, snippet

InputParser = Literal["balanced", "reference"]

# `\s*` then `\w+`: disjoint classes, so a failed match gives back each character once (linear).
_ACTION_RE = re.compile(r"Action:\s*(\w+)")
# The lookahead keeps the match end on the `{` itself.
_ACTION_INPUT_RE = re.compile(r"Action Input:\s*(?=\{)")
_DECODER = json.JSONDecoder()
_FIRST_WINDOW = 512
# A response of 8192 tokens holds at most ~1,600 `Action Input: {}` blocks, so this bound never
# changes a score the trainer can see; it caps the per-block Python cost on 10 MB hostile text.
MAX_ACTION_INPUT_BLOCKS = 10_000
# A response of 8192 tokens is at most 1.05M characters (Qwen3's longest token has 128), and the
# decode windows re-read at most a third of it, so this cap never changes a score the trainer can
# see either; it bounds the decoding of 10 MB of dense hostile JSON to ~0.4 s.
MAX_DECODED_CHARS = 4_000_000
_SHORT_REPR = reprlib.Repr(maxlevel=3, maxdict=6, maxlist=6, maxstring=40, maxother=40)


class _OverBudget(Exception):
    pass


def decode_object_at(text: str, start: int, budget: list[int]) -> tuple[Any, int] | None:
    """The JSON value starting at text[start] and the index just past it, or None if invalid.

    Decodes a window that grows only while the failure may be the window's own cut, because a
    JSONDecodeError on the full text costs O(start) to build (it counts lines up to the error),
    which over many failed `Action Input: {` blocks would make a 10 MB response quadratic.
    ``budget``: [characters the decoder may still read]; each attempt takes what it read, and
    _OverBudget is raised once a value would need more.
    """
    size = _FIRST_WINDOW
    while True:
        limit = min(size, budget[0])
        window = text[start : start + limit]
        try:
            value, end = _DECODER.raw_decode(window)
            budget[0] -= end
            return value, start + end
        except json.JSONDecodeError as err:
            # an unterminated string is reported at its start, but was read to the window's end
            budget[0] -= limit if err.msg.startswith("Unterminated string") else err.pos
            cut_by_window = start + limit < len(text) and (
                err.pos >= limit - 8 or err.msg.startswith("Unterminated string")
            )
            if not cut_by_window:
                return None
            if limit < size:  # the budget, not the window, cut this value
                raise _OverBudget from None
            size *= 4
        except (ValueError, RecursionError):  # huge ints, nesting deeper than the recursion limit
            budget[0] -= limit
            return None


def parse_tool_ground_truth(ground_truth: str | list) -> tuple[list[str], dict]:
    """Gold action names and the merged gold input dict. ValueError on malformed gold."""
    items = ground_truth
    if isinstance(ground_truth, str):
        try:
            items = json.loads(ground_truth)
        except ValueError as err:
            raise ValueError(f"tool-use ground truth is not JSON: {err}") from None
    if not isinstance(items, list):
        raise ValueError(f"tool-use ground truth must be a JSON list, got {type(items).__name__}")
    names, merged = [], {}
    for pos, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("Action"), str):
            raise ValueError(f"tool-use ground truth item {pos} needs a string 'Action': {item!r}")
        raw_input = item.get("Action_Input", "{}")
        try:
            inputs = json.loads(raw_input) if isinstance(raw_input, str) else raw_input
        except ValueError as err:
            raise ValueError(f"tool-use ground truth item {pos}: Action_Input is not JSON: {err}") from None
        if not isinstance(inputs, dict):
            raise ValueError(f"tool-use ground truth item {pos}: Action_Input must be a JSON object")
        names.append(item["Action"])
        merged.update(inputs)
    return names, merged


def extract_actions(response: str) -> list[str]:
    """Every name written after `Action:`."""
    return _ACTION_RE.findall(response)


def extract_action_inputs(response: str, parser: InputParser = "balanced") -> dict | None:
    """Merge every `Action Input: {...}` object that parses (later keys override).

    None if the response holds more than MAX_ACTION_INPUT_BLOCKS candidate blocks, or its blocks
    need more than MAX_DECODED_CHARS characters of JSON decoding.
    """
    merged: dict = {}
    pos = 0
    budget = [MAX_DECODED_CHARS]
    for _ in range(MAX_ACTION_INPUT_BLOCKS + 1):
        match = _ACTION_INPUT_RE.search(response, pos)
        if match is None:
            return merged
        brace = match.end()
        if parser == "reference":
            close = response.find("}", brace)
            if close < 0:  # no `}` anywhere after: no later block can match either
                return merged
            block, pos = response[brace : close + 1], close + 1
            budget[0] -= len(block)
            if budget[0] < 0:
                return None
            try:
                parsed = json.loads(block)
            except (ValueError, RecursionError):
                continue
        else:
            try:
                decoded = decode_object_at(response, brace, budget)
            except _OverBudget:
                return None
            if decoded is None:
                pos = brace + 1
                continue
            parsed, pos = decoded
        if isinstance(parsed, dict):
            merged.update(parsed)
    return None


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values where the JSON type counts (true != 1, 1 != 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def score_tool_use(
    response: str, ground_truth: str | list, *, parser: InputParser = "balanced"
) -> RewardResult:
    """Score one response against the gold tool calls.

    Never raises on any `response` str. Raises ValueError on malformed ground truth or parser.
    """
    if parser not in ("balanced", "reference"):
        raise ValueError(f"tool-use parser must be 'balanced' or 'reference', got {parser!r}")
    gold_names, gold_inputs = parse_tool_ground_truth(ground_truth)
    if not isinstance(response, str):
        return RewardResult(0.0, f"response is {type(response).__name__}, not str", parsed=False)
    names = extract_actions(response)
    if Counter(names) != Counter(gold_names):
        shown = snippet(repr(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else ""), 120)
        why = f"actions {shown}, expected {snippet(repr(gold_names), 120)}"
        return RewardResult(0.0, why, parsed=bool(names))
    inputs = extract_action_inputs(response, parser)
    if inputs is None:
        return RewardResult(
            0.0,
            f"more than {MAX_ACTION_INPUT_BLOCKS} 'Action Input' blocks or {MAX_DECODED_CHARS} characters of them",
            parsed=False,
        )
    try:
        same = inputs == gold_inputs if parser == "reference" else json_equal(inputs, gold_inputs)
    except RecursionError:
        same = False
    if same:
        return RewardResult(1.0, "correct", parsed=True)
    return RewardResult(
        0.0,
        f"action inputs {snippet(_SHORT_REPR.repr(inputs), 120)}, "
        f"expected {snippet(_SHORT_REPR.repr(gold_inputs), 120)}",
        parsed=True,
    )
