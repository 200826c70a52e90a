import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_megatron.rewards import RewardResult, get_reward_fn, score_tool_use
from srpo_megatron.rewards.tool_use import (
    MAX_ACTION_INPUT_BLOCKS,
    MAX_DECODED_CHARS,
    extract_action_inputs,
    extract_actions,
    json_equal,
    parse_tool_ground_truth,
)


def gold(*calls):
    return json.dumps([{"Action": name, "Action_Input": json.dumps(inputs)} for name, inputs in calls])


AXOLOTL = gold(("searchAxolotlImages", {"color": "wild", "gender": "", "size": "medium", "page": 1}))
AXOLOTL_OK = (
    "Thought: the user wants wild medium axolotls.\n"
    "Action: searchAxolotlImages\n"
    'Action Input: {"color": "wild", "gender": "", "size": "medium", "page": 1}'
)


def test_worked_example_correct():
    result = score_tool_use(AXOLOTL_OK, AXOLOTL)
    assert (result.score, result.reason) == (1.0, "correct")


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (AXOLOTL_OK.replace('"page": 1', '"page": "1"'), "action inputs"),  # types count
        (AXOLOTL_OK.replace('"page": 1', '"page": 1.0'), "action inputs"),
        (AXOLOTL_OK.replace(', "page": 1', ""), "action inputs"),
        (AXOLOTL_OK.replace("searchAxolotlImages", "getAxolotlFacts"), "actions"),
        (AXOLOTL_OK + "\nAction: searchAxolotlImages", "actions"),  # multiset: one call too many
        ("Action Input: {}", "actions"),
        ("", "actions"),
    ],
)
def test_worked_examples_wrong(response, why):
    result = score_tool_use(response, AXOLOTL)
    assert result.score == 0.0
    assert result.reason.startswith(why)


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        (AXOLOTL_OK, True),
        (AXOLOTL_OK.replace("searchAxolotlImages", "getAxolotlFacts"), True),  # wrong call, in the format
        ("Action: searchAxolotlImages\nAction Input: {color: wild}", True),  # not JSON: a wrong input
        ("Action Input: {}", False),
        ("I would search for wild axolotls.", False),
        ("", False),
    ],
)
def test_parsed_is_the_format_whatever_the_score(response, parsed):
    assert score_tool_use(response, AXOLOTL).parsed is parsed


def test_parsed_against_a_gold_without_calls_and_past_the_caps():
    assert score_tool_use("No tool is needed.", "[]") == RewardResult(1.0, "correct", parsed=True)
    capped = "Action: f\n" + 'Action Input: {"n": 1}\n' * (MAX_ACTION_INPUT_BLOCKS + 1)
    assert not score_tool_use(capped, gold(("f", {"n": 1}))).parsed


def test_multiple_calls_merge_inputs_and_count_names():
    truth = gold(("a", {"x": 1}), ("b", {"y": [1, 2]}), ("a", {}))
    response = 'Action: a\nAction Input: {"x": 1}\nAction: b\nAction Input: {"y": [1, 2]}\nAction: a\nAction Input: {}'
    assert score_tool_use(response, truth).score == 1.0
    # Order of calls does not matter (multiset of names, merged dict of inputs).
    reordered = 'Action: b\nAction Input: {"y": [1, 2]}\nAction: a\nAction Input: {}\nAction: a\nAction Input: {"x": 1}'
    assert score_tool_use(reordered, truth).score == 1.0
    # Later keys override earlier ones.
    overridden = response + '\nAction Input: {"x": 2}'
    assert score_tool_use(overridden, truth).score == 0.0


def test_nested_input_balanced_vs_reference():
    truth = gold(("createEvent", {"event": {"name": "x", "when": {"day": 3}}, "notify": True}))
    response = (
        'Action: createEvent\nAction Input: {"event": {"name": "x", "when": {"day": 3}}, "notify": true}'
    )
    assert score_tool_use(response, truth).score == 1.0
    # The SDPO reference stops at the first `}`: the block does not parse, so it can never score.
    assert score_tool_use(response, truth, parser="reference").score == 0.0


def test_reference_parser_matches_sdpo_on_flat_inputs_and_python_equality():
    truth = gold(("f", {"n": 1}))
    assert score_tool_use('Action: f\nAction Input: {"n": 1}', truth, parser="reference").score == 1.0
    # Python == says 1 == 1.0 == True: the reference scores these correct, the default does not.
    for value in ["1.0", "true"]:
        response = f'Action: f\nAction Input: {{"n": {value}}}'
        assert score_tool_use(response, truth, parser="reference").score == 1.0
        assert score_tool_use(response, truth).score == 0.0


def test_invalid_json_blocks_are_skipped():
    truth = gold(("f", {"n": 1}))
    response = 'Action: f\nAction Input: {n: 1}\nAction Input: {"n": 1,}\nAction Input: {"n": 1}'
    assert score_tool_use(response, truth).score == 1.0
    assert score_tool_use(response, truth, parser="reference").score == 1.0
    assert extract_action_inputs("Action Input: [1, 2]") == {}
    assert extract_action_inputs('Action Input:\n\n  {"a": "}"}') == {"a": "}"}


def test_extract_actions_like_the_reference():
    assert extract_actions("Action: getX\nAction Input: {}\nAction:  \n putY") == ["getX", "putY"]
    assert extract_actions("Action:") == []


def test_empty_gold_input_and_parsed_list_gold():
    assert score_tool_use("Action: ping\nAction Input: {}", gold(("ping", {}))).score == 1.0
    parsed = [{"Action": "ping", "Action_Input": "{}"}]
    assert score_tool_use("Action: ping", parsed).score == 1.0


@pytest.mark.parametrize(
    "bad", ["not json", "{}", '[{"Action_Input": "{}"}]', '[{"Action": "a", "Action_Input": "{"}]', "[1]"]
)
def test_malformed_gold_is_a_data_error(bad):
    with pytest.raises(ValueError, match="ground truth"):
        parse_tool_ground_truth(bad)


def test_bad_parser_name():
    with pytest.raises(ValueError, match="parser"):
        score_tool_use("", gold(), parser="greedy")
    with pytest.raises(ValueError, match="tool_use_parser"):
        get_reward_fn("tooluse", tool_use_parser="greedy")


def test_registry_tool_use_with_parser_option():
    truth = gold(("createEvent", {"e": {"d": 1}}))
    response = 'Action: createEvent\nAction Input: {"e": {"d": 1}}'
    assert get_reward_fn("tooluse")(response, truth).score == 1.0
    assert get_reward_fn("tooluse", tool_use_parser="reference")(response, truth).score == 0.0


def test_json_equal_types_count():
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})
    assert not json_equal({"a": 1}, {"a": True})
    assert not json_equal([1], [1.0])
    assert not json_equal({"a": 1}, {"b": 1})


def test_hostile_inputs():
    truth = gold(("f", {"n": 1}))
    cases = [
        "Action: f\n" + "Action Input: {" * 100_000,
        "Action: f\n" + 'Action Input: {"a": ' + "[" * 200_000,
        'Action: f\nAction Input: {"n": 1' + "9" * 20_000 + "}",  # int beyond Python's digit limit
        "Action: f\n" + 'Action Input: {"n": "\ud800"}',
        "Action: f\n" + "}" * 100_000 + "{" * 100_000,
    ]
    for response in cases:
        for parser in ("balanced", "reference"):
            result = score_tool_use(response, truth, parser=parser)
            assert result.score == 0.0
            result.reason.encode("utf-8")


def test_block_cap():
    truth = gold(("f", {"n": 1}))
    response = "Action: f\n" + 'Action Input: {"n": 1}\n' * (MAX_ACTION_INPUT_BLOCKS + 1)
    assert "more than" in score_tool_use(response, truth).reason
    response = "Action: f\n" + 'Action Input: {"n": 1}\n' * 100
    assert score_tool_use(response, truth).score == 1.0


@pytest.mark.parametrize("parser", ["balanced", "reference"])
def test_decode_cap(parser):
    truth = gold(("f", {"n": 1}))
    # dense JSON past the cap, overridden by a correct block: uncapped, this scored 1.0 after
    # decoding all of it (about 1 s per 10 MB)
    dense = 'Action Input: {"n": [' + "1," * (MAX_DECODED_CHARS // 2) + "1]}\n"
    result = score_tool_use("Action: f\n" + dense + 'Action Input: {"n": 1}', truth, parser=parser)
    assert result.score == 0.0 and "characters of them" in result.reason
    # the longest response the trainer can sample (8192 tokens x 128 characters) is not capped
    padded = 'Action: f\nAction Input: {"n":' + " " * (8192 * 128) + "1}"
    assert score_tool_use(padded, truth, parser=parser).score == 1.0


def test_long_valid_object_crosses_the_decode_window():
    value = "x" * 5000
    truth = gold(("f", {"s": value, "t": {"u": value}}))
    response = f'Action: f\nAction Input: {{"s": "{value}", "t": {{"u": "{value}"}}}}'
    assert score_tool_use(response, truth).score == 1.0


tool_soup = st.lists(
    st.sampled_from(
        [
            "Action:",
            "Action Input:",
            " ",
            "\n",
            "{",
            "}",
            "[",
            "]",
            '"',
            ":",
            ",",
            "\\",
            "f",
            "n",
            "1",
            "true",
            "\ud800",
        ]
    ),
    max_size=50,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(response=st.one_of(st.text(), tool_soup), parser=st.sampled_from(["balanced", "reference"]))
def test_fuzz_never_raises(response, parser):
    result = score_tool_use(response, gold(("f", {"n": 1})), parser=parser)
    assert result.score in (0.0, 1.0)
    result.reason.encode("utf-8")
    assert result.parsed or result.score == 0.0
