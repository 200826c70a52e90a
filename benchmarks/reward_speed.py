"""Time the verifiers on ~10 MB hostile responses (ALGORITHM.md sec. 8: never hang).

Each case is scored once per verifier (and per tool-use parser); the figure is wall time per
call. The target is < 1 s per 10 MB response on one CPU core. Prints a table, then one JSON line.

    python benchmarks/reward_speed.py [--mb 10]
"""

import argparse
import json
import time

from srpo_megatron.rewards import score_science_mcq, score_tool_use

_TOOL_GOLD = json.dumps([{"Action": "search", "Action_Input": json.dumps({"q": "x", "opts": {"n": 1}})}])


def hostile_cases(size: int) -> dict[str, str]:
    """Texts of about `size` characters built to defeat naive scanners."""

    def fill(unit: str) -> str:
        return unit * (size // len(unit) + 1)

    # Every case names the gold action once, so the tool-use verifier gets past the action check and
    # has to scan the whole text for `Action Input` objects.
    cases = {
        "plain_text": fill("lorem ipsum dolor sit amet "),
        "many_answer_tags": fill("<answer>A</answer>"),
        "open_answer_tags": fill("<answer>"),
        "many_action_inputs": fill('Action Input: {"q": "x"}\n'),
        "many_nested_inputs": fill('Action Input: {"q": {"r": [1, {"s": null}]}}'),
        "unclosed_braces": fill("Action Input: {"),
        "unclosed_string": 'Action Input: {"q": "' + fill("Action Input: {x "),
        "deep_nesting": 'Action Input: {"a": ' + "[" * (size - 30),
        "whitespace_after_tags": "Action Input:" + " " * size + "Action Input:" + "\n" * 10,
        "odd_unicode": fill("\ud800\u202e\u0000𝔘<answer>\ufeff</answer>{"),
        "one_valid_call": fill("x") + 'Action Input: {"q": "x", "opts": {"n": 1}}',
        # dense JSON: Python's decoder reads it at ~10 MB/s, so only the decode cap keeps these fast
        "one_json_array": 'Action Input: {"q": [' + "1," * (size // 2) + "1]}",
        "one_open_json_array": 'Action Input: {"q": [' + "1," * (size // 2),
        "json_array_of_objects": 'Action Input: {"q": [' + '{"r": 1},' * (size // 9) + "1]}",
        "open_arrays_1kb": fill('Action Input: {"a": [' + "1," * 500),
        "open_arrays_100kb": fill('Action Input: {"a": [' + "1," * 50_000),
        "closed_arrays_600b": fill('Action Input: {"a": [' + "1," * 290 + "1]}"),
    }
    return {name: "Action: search\n" + text for name, text in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="size of each response in MB")
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    scorers = {
        "science_mcq": lambda text: score_science_mcq(text, "A"),
        "tool_use": lambda text: score_tool_use(text, _TOOL_GOLD),
        "tool_use_reference": lambda text: score_tool_use(text, _TOOL_GOLD, parser="reference"),
    }
    seconds: dict[str, float] = {}
    print(f"{'case':<24}{'verifier':<20}{'seconds':>9}  score  reason")
    for case, text in hostile_cases(size).items():
        for name, scorer in scorers.items():
            start = time.perf_counter()
            result = scorer(text)
            elapsed = time.perf_counter() - start
            seconds[f"{case}/{name}"] = round(elapsed, 4)
            print(f"{case:<24}{name:<20}{elapsed:>9.3f}  {result.score:.1f}    {result.reason[:50]}")
    worst = max(seconds, key=seconds.get)
    summary = {
        "mb": args.mb,
        "max_seconds": seconds[worst],
        "worst_case": worst,
        "under_1s": seconds[worst] < 1.0,
    }
    print(json.dumps({"benchmark": "reward_speed", **summary, "seconds": seconds}))


if __name__ == "__main__":
    main()
