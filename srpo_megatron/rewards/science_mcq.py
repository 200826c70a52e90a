"""Science multiple-choice verifier (SciKnowEval L3, SDPO's protocol; ALGORITHM.md sec. 8).

reward = 1.0 iff strip(text inside the LAST `<answer>...</answer>`) == gold letter, else 0.0.

Differences from the SDPO reference (`text.split("<answer>")[-1].split("</answer>")[0]`), both
deliberate: a response with no `<answer>` tag scores 0 (the reference compares the whole stripped
response, so a bare "B" would score 1), and a last `<answer>` that is never closed scores 0 (the
reference reads to the end of the text). Both follow ALGORITHM.md: "No tag -> 0.0".

The answer is parsed (``RewardResult.parsed``, the format rate) iff the response has a last
`<answer>` tag that is closed, whatever it holds.

Cost: two reverse substring searches, O(len(response)), whatever the text holds.
"""

from srpo_megatron.rewards.result import RewardResult, snippet

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"


def extract_last_answer(response: str) -> str | None:
    """The stripped text inside the last `<answer>...</answer>`, or None if there is none.

    The last opening tag decides; it must be closed after it. Nested or repeated tags inside the
    last pair cannot happen: the last opening tag has no other opening tag after it.
    """
    start = response.rfind(OPEN_TAG)
    if start < 0:
        return None
    end = response.find(CLOSE_TAG, start + len(OPEN_TAG))
    if end < 0:
        return None
    return response[start + len(OPEN_TAG) : end].strip()


def score_science_mcq(response: str, ground_truth: str) -> RewardResult:
    """Score one response against the gold option letter (e.g. "B").

    Never raises on any `response` str (hostile text included). Raises ValueError if the
    ground truth is not a non-empty string: that is a data error, not a model error.
    """
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"science MCQ ground truth must be a non-empty string, got {ground_truth!r}")
    if not isinstance(response, str):
        return RewardResult(0.0, f"response is {type(response).__name__}, not str", parsed=False)
    answer = extract_last_answer(response)
    if answer is None:
        if response.rfind(OPEN_TAG) >= 0:
            return RewardResult(0.0, "last <answer> tag is not closed", parsed=False)
        return RewardResult(0.0, "no <answer> tag", parsed=False)
    gold = ground_truth.strip()
    if answer == gold:
        return RewardResult(1.0, "correct", parsed=True)
    return RewardResult(0.0, f"answered {snippet(answer)!r}, expected {gold!r}", parsed=True)
