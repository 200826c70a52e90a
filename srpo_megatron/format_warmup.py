"""The format warm-up: a short supervised training loop that makes the tiny starting checkpoint of
the CPU run (``tools/make_tiny_model.py``) from a random tiny Qwen3 (``models/qwen3/tiny.py``). It
teaches the answer FORMAT only.

A randomly initialised model never writes `<answer>X</answer>`, so RL from it would see reward 0
forever. A short supervised warm-up on synthetic prompts with targets
`<answer>X</answer><|im_end|>`, X drawn uniformly at random and independently of the question,
teaches the format but not the rule: the best the warm-up can do is predict 1/4 for each letter,
so the warmed-up model answers in format at chance accuracy (25%) and RL has room to climb.

Half of the warm-up prompts (``WarmupConfig.teacher_fraction``) are SDPO teacher prompts instead
(ALGORITHM.md sec. 2: the question, then "Correct solution: <answer>X</answer>"), whose target is
that same X. This teaches the tiny model what a Qwen3-8B brings by itself: reading a solution in
its context. Without it the self-teacher of the tiny run is as clueless as the student and SDPO has
nothing to distil. The letter X is still random, so nothing about the rule leaks.

Cost: the loss needs logits only at the 7 target positions, so the 151,936-row output layer is
applied to those hidden states alone, not to the whole prompt.
"""

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srpo_megatron.data.synthetic import LETTERS, make_synthetic_rows
from srpo_megatron.data.teacher_prompt import build_teacher_messages
from srpo_megatron.data.templating import encode_prompt
from srpo_megatron.rewards import score_science_mcq
from srpo_megatron.runtime.progress import progress_bar

_FORMAT_RE = re.compile(r"<answer>[A-D]</answer>")


@dataclass
class WarmupConfig:
    """Defaults measured on 2 CPU cores (seed 0, ``outputs/tiny_qwen3/warmup.json``): 200 steps x 16
    at lr 1e-3 in 135 s -> loss 0.174 (the floor is ln(4)/7 = 0.198 on answer prompts, one uniformly
    random token in seven; teacher prompts can go below it: their letter is in the prompt), 88% in
    format at temperature 1 (100% greedy), accuracy 24% (26% greedy)."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    teacher_fraction: float = 0.5
    """share of warm-up prompts written as SDPO teacher prompts (target: the letter in the solution)"""


def answer_ids(tokenizer, letter: str) -> list[int]:
    """Target tokens of one answer: `<answer>X</answer>` then the end-of-turn token."""
    return tokenizer.encode(f"<answer>{letter}</answer>", add_special_tokens=False) + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]


def _batch(tokenizer, prompts: list[list[int]], targets: list[list[int]]):
    """Right-padded [B, T] input ids, attention mask, and the (row, position) of each target token."""
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    seqs = [p + t for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        seq = prompt + target
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        # the logits at position p predict token p + 1
        rows += [i] * len(target)
        cols += range(len(prompt) - 1, len(seq) - 1)
        labels += target
    return input_ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)


def format_warmup(model, tokenizer, config: WarmupConfig, *, progress: bool = False) -> list[float]:
    """Supervised warm-up on the answer format with uniformly random letters; returns the losses.

    Deterministic by config.seed: the prompts and letters come from seeded `random.Random`
    streams and the model is trained in a fixed order with a fixed thread count.
    progress: draw a bar with the loss and the time left (about 150 s of the tiny run's first start).
    """
    rows = make_synthetic_rows(config.steps * config.batch_size, config.seed, split="warmup")
    letters = random.Random(f"warmup-letters/{config.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    losses = []
    with progress_bar(progress) as bar:
        task = bar.add_task("format warm-up", total=config.steps)
        for step in range(config.steps):
            batch = rows[step * config.batch_size : (step + 1) * config.batch_size]
            prompts, targets = [], []
            for row in batch:
                letter = letters.choice(LETTERS)
                messages = row.messages
                if letters.random() < config.teacher_fraction:
                    messages = build_teacher_messages(messages, f"<answer>{letter}</answer>")
                prompts.append(encode_prompt(tokenizer, messages))
                targets.append(answer_ids(tokenizer, letter))
            input_ids, mask, rows_at, cols_at, labels = _batch(tokenizer, prompts, targets)
            hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, H]
            logits = model.lm_head(hidden[rows_at, cols_at])  # [N, V], N = target tokens only
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"format warm-up, loss {losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate_format(model, tokenizer, num_prompts: int = 64, seed: int = 0, temperature: float = 1.0) -> dict:
    """Sample one answer per synthetic test prompt (full-vocabulary sampling at `temperature`,
    or greedy at 0) and return {"format_rate", "accuracy", "num_prompts"}."""
    rows = make_synthetic_rows(num_prompts, seed, split="test")
    prompts = [encode_prompt(tokenizer, row.messages) for row in rows]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    if temperature == 0:
        sampling = {"do_sample": False}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=9,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=pad,
        **sampling,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    in_format = sum(bool(_FORMAT_RE.fullmatch(text.strip())) for text in texts)
    correct = sum(
        score_science_mcq(text, row.ground_truth).score for text, row in zip(texts, rows, strict=True)
    )
    return {"format_rate": in_format / len(rows), "accuracy": correct / len(rows), "num_prompts": len(rows)}
