"""The value every verifier returns, and a helper that keeps reasons printable."""

from dataclasses import dataclass

# Reasons quote at most this many characters of the model's text: a reason is a log line,
# never a copy of a 10 MB response.
_SNIPPET_CHARS = 40


@dataclass(frozen=True)
class RewardResult:
    """Outcome of scoring one response.

    score: the reward in [0, 1] (the verifiers here return exactly 0.0 or 1.0).
    reason: a short human-readable explanation ("correct", "no <answer> tag", ...), always
        valid UTF-8 so it can be logged or written to JSON without another check.
    parsed: the response holds an answer in the task's format, right or wrong (each verifier's
        docstring says what that is); a correct response always has one. The share of responses
        with one is a run's format rate, which falls when a policy loses the format.
    """

    score: float
    reason: str
    parsed: bool


def snippet(text: str, limit: int = _SNIPPET_CHARS) -> str:
    """Shorten `text` for a reason string; lone surrogates become escapes instead of raising later."""
    short = text if len(text) <= limit else text[:limit] + "..."
    return short.encode("utf-8", "backslashreplace").decode("utf-8")
