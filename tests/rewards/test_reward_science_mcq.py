import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_megatron.rewards import RewardResult, get_reward_fn, score_science_mcq
from srpo_megatron.rewards.science_mcq import extract_last_answer


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<reasoning>\nIt is B.\n</reasoning>\n<answer>\nB\n</answer>", 1.0),
        ("<answer>B</answer>", 1.0),
        ("<answer>  B \t</answer>", 1.0),
        ("<answer>A</answer> on second thought <answer>B</answer>", 1.0),  # the last tag wins
        ("<answer>B</answer> on second thought <answer>A</answer>", 0.0),
        ("<answer>b</answer>", 0.0),  # exact match, case counts
        ("<answer>B: 56 pC</answer>", 0.0),  # the letter only
        ("<answer>(B)</answer>", 0.0),
        ("B", 0.0),  # no tag -> 0 (the SDPO reference would score this 1)
        ("<answer>B", 0.0),  # last tag never closed
        ("<answer>B</answer><answer>", 0.0),
        ("</answer>B<answer>", 0.0),
        ("", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer><answer>B</answer></answer>", 1.0),
    ],
)
def test_worked_examples(response, score):
    result = score_science_mcq(response, "B")
    assert isinstance(result, RewardResult)
    assert result.score == score
    assert result.reason


def test_reasons_name_the_failure():
    assert score_science_mcq("no tags here", "A").reason == "no <answer> tag"
    assert score_science_mcq("<answer>A", "A").reason == "last <answer> tag is not closed"
    assert score_science_mcq("<answer>C</answer>", "A").reason == "answered 'C', expected 'A'"
    assert score_science_mcq("<answer>A</answer>", "A").reason == "correct"


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("<answer>B</answer>", True),
        ("<answer>C</answer>", True),  # a wrong answer, in the format
        ("<answer></answer>", True),
        ("<answer>A</answer> on second thought <answer>B", False),  # the last tag decides
        ("B", False),
        ("", False),
        (b"<answer>B</answer>", False),
    ],
)
def test_parsed_is_the_format_whatever_the_score(response, parsed):
    assert score_science_mcq(response, "B").parsed is parsed


def test_gold_is_stripped_and_bad_gold_is_a_data_error():
    assert score_science_mcq("<answer>D</answer>", " D\n").score == 1.0
    for bad in ["", "   ", None, 3]:
        with pytest.raises(ValueError, match="ground truth"):
            score_science_mcq("<answer>D</answer>", bad)


def test_extract_last_answer():
    assert extract_last_answer("x <answer> C </answer> y") == "C"
    assert extract_last_answer("nothing") is None


def test_huge_and_odd_inputs_do_not_raise():
    big = "<answer>" * 1_000_000 + "A</answer>"
    assert score_science_mcq(big, "A").score == 1.0
    assert score_science_mcq("\ud800<answer>\udfff</answer>", "A").reason.encode("utf-8")
    assert score_science_mcq(b"<answer>A</answer>", "A").score == 0.0  # bytes are not text


def test_registry_routes_science_sources():
    for source in ["sciknoweval", "SciKnowEval", "chemistry", "synthetic_mcq"]:
        assert get_reward_fn(source)("<answer>A</answer>", "A").score == 1.0


def test_registry_error_lists_known_sources():
    with pytest.raises(ValueError, match="sciknoweval.*tooluse"):
        get_reward_fn("gsm8k")


tag_soup = st.lists(
    st.sampled_from(
        ["<answer>", "</answer>", "A", "B", " ", "\n", "<", ">", "/", "answer", "\ud800", "\x00"]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(response=st.one_of(st.text(), tag_soup), gold=st.sampled_from(["A", "B", "C", "D"]))
def test_fuzz_never_raises(response, gold):
    result = score_science_mcq(response, gold)
    assert result.score in (0.0, 1.0)
    result.reason.encode("utf-8")  # always loggable
    if result.score == 1.0:
        assert extract_last_answer(response) == gold
    assert result.parsed == (extract_last_answer(response) is not None)
