"""A verifiable task a tiny Qwen3 can learn on 2 CPU cores in minutes ("pick the marked option").

Each prompt lists four one-token words as options A-D; exactly one line ends with ` *`, and the
answer is that line's letter. The system prompt asks for `<answer>X</answer>` only, so a response
is 7 tokens and the whole templated prompt about 53 (the 151,936-row output layer dominates the
cost of every token). Rows use data_source "synthetic_mcq", scored by the science verifier.

Why this rule: it is a pure attention pattern (find the `*`, copy the letter three tokens before
it) that a 2-layer, hidden-128 model can represent, the marked position is uniform so chance is
exactly 25%, and nothing in the prompt's wording gives the answer away to a model that has not
learnt it. The format warm-up (format_warmup.py) teaches `<answer>X</answer>` with random letters,
so RL starts near 25% and has room to climb.
"""

import random

from srpo_megatron.data.prompts import SYNTHETIC_SYSTEM_PROMPT
from srpo_megatron.data.rows import PromptRow

DATA_SOURCE = "synthetic_mcq"
LETTERS = "ABCD"
# Each is one Qwen3 token when preceded by a space, so every prompt has the same shape.
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "house",
    "paper",
    "glass",
    "water",
    "light",
    "green",
    "table",
    "chair",
    "plant",
    "bread",
    "horse",
    "mouse",
    "music",
    "train",
    "field",
    "night",
    "money",
    "phone",
    "ocean",
    "tiger",
    "eagle",
    "sugar",
    "salt",
    "metal",
    "silver",
    "gold",
    "honey",
    "lemon",
    "orange",
    "grape",
    "tomato",
    "forest",
    "desert",
    "island",
    "garden",
    "window",
    "bottle",
    "coffee",
]


def make_question(rng: random.Random) -> tuple[str, str]:
    """(user message, answer letter) for one question drawn from `rng`."""
    words = rng.sample(WORDS, len(LETTERS))
    marked = rng.randrange(len(LETTERS))
    lines = [
        f"{letter}: {word}" + (" *" if i == marked else "")
        for i, (letter, word) in enumerate(zip(LETTERS, words, strict=True))
    ]
    return "\n".join(lines), LETTERS[marked]


def make_synthetic_rows(num_rows: int, seed: int, split: str = "train") -> list[PromptRow]:
    """`num_rows` questions; the same (seed, split) always gives the same rows, and different
    splits draw from independent streams (so train and test of one seed differ)."""
    rng = random.Random(f"{DATA_SOURCE}/{split}/{seed}")  # str seeds are hashed deterministically
    rows = []
    for index in range(num_rows):
        question, answer = make_question(rng)
        messages = [
            {"role": "system", "content": SYNTHETIC_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        rows.append(PromptRow(DATA_SOURCE, messages, answer, {"split": split, "index": index}))
    return rows
