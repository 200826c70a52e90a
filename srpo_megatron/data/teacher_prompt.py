"""Teacher prompts for the SDPO branch (paper App. B.5; ALGORITHM.md sec. 2).

    sibling text    = strip_think(decode(sibling response ids, skip special tokens))
    teacher messages = student messages, LAST user content replaced by
        "{user}\\nCorrect solution:\\n\\n{sibling text}\\n\\nCorrectly solve the original question."
    teacher ids      = right-truncate(chat_template(teacher messages, generation prompt, thinking off),
                                      max_prompt_len) + student response ids

The teacher never generates: it re-scores the student's own response tokens under the richer
context, so the response ids are appended unchanged. Tokenizer-level code lives here (data/), not
in algorithms/, which stays pure tensor math.
"""

import copy
import re
from typing import Any, Protocol

THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
REPROMPT_TEMPLATE = "{prompt}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."


class ChatTokenizer(Protocol):
    """What this module needs from a tokenizer (HF tokenizers satisfy it)."""

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def strip_think(text: str) -> str:
    """Remove every `<think>...</think>` block, and anything before a stray leading `</think>` (a
    response that began inside a think block opened by the prompt); strip outer whitespace."""
    text = THINK_BLOCK.sub("", text)
    if "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        text = text.split("</think>", 1)[1]
    return text.strip()


def build_teacher_messages(messages: list[dict[str, str]], sibling_text: str) -> list[dict[str, str]]:
    """The student's messages with the last user message's content replaced by the reprompt."""
    user_turns = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        raise ValueError("the prompt has no user message to attach the correct solution to")
    teacher = copy.deepcopy(messages)
    last = user_turns[-1]
    teacher[last]["content"] = REPROMPT_TEMPLATE.format(
        prompt=messages[last]["content"], solution=sibling_text
    )
    return teacher


def build_teacher_input_ids(
    tokenizer: ChatTokenizer,
    messages: list[dict[str, str]],
    sibling_response_ids: list[int],
    response_ids: list[int],
    max_prompt_len: int,
) -> tuple[list[int], int]:
    """Token ids of the teacher's input and the length of its prompt part.

    Args:
        tokenizer: any object with apply_chat_template / encode / decode (HF tokenizers do).
        messages: the student's chat messages [{"role", "content"}].
        sibling_response_ids: response ids of the correct sibling (the teacher information).
        response_ids: the student's own response ids, appended unchanged.
        max_prompt_len: the teacher prompt is cut to its first max_prompt_len tokens.
    Returns:
        (prompt ids + response ids, number of prompt ids).
    """
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    sibling_text = strip_think(tokenizer.decode(list(sibling_response_ids), skip_special_tokens=True))
    teacher_messages = build_teacher_messages(messages, sibling_text)
    # Render to text then encode: apply_chat_template(tokenize=True) changed its return type
    # (list vs BatchEncoding) across transformers versions.
    text = tokenizer.apply_chat_template(
        teacher_messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    prompt_ids = list(tokenizer.encode(text, add_special_tokens=False))[:max_prompt_len]
    return prompt_ids + list(response_ids), len(prompt_ids)
