"""HF model directories: read safetensors slice by slice, write sharded safetensors with an index.

Reading never materialises more than the requested slice: ``safe_open(...).get_slice`` maps the
file and copies only the rows/columns asked for. Writing keeps at most one shard in memory.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class SafetensorsReader:
    """The tensors of an HF directory: ``model.safetensors`` or shards listed in the index."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.hf_dir / SINGLE_FILE).is_file():
            with safe_open(self.hf_dir / SINGLE_FILE, "pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise ValueError(f"{self.hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        missing = sorted({f for f in weight_map.values() if not (self.hf_dir / f).is_file()})
        if missing:
            raise ValueError(f"{index} lists shard file(s) that do not exist: {missing}")
        self.weight_map = weight_map
        self._files: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _slice(self, name: str):
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = safe_open(self.hf_dir / file, "pt")
        return self._files[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._slice(name).get_dtype()]

    def read(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """``tensor[rows, cols]`` (``tensor[rows]`` for 1-d tensors), reading only that slice."""
        sl = self._slice(name)
        return sl[rows] if len(sl.get_shape()) == 1 else sl[rows, cols]


class ShardedSafetensorsWriter:
    """Writes ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` + the index.

    ``add`` tensors one at a time; ``close`` writes the last shard, renames the shards to their
    final ``-of-n`` names and writes ``model.safetensors.index.json``. Returns the files written.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # an owned, contiguous CPU copy: safetensors refuses views of larger storages
        self._pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map, written = {}, []
        for k, (tmp, names) in enumerate(self._shards):
            final = self.out_dir / f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(final)
            written.append(final)
            weight_map |= dict.fromkeys(names, final.name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*written, self.out_dir / INDEX_FILE]


def write_json(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


def generation_config_from(config: dict[str, Any]) -> dict[str, Any]:
    """A minimal generation_config.json from the model config's special token ids."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy the tokenizer files found in ``tokenizer_dir``; ValueError if there are none."""
    src, dst = Path(tokenizer_dir), Path(out_dir)
    copied = [Path(shutil.copy2(src / f, dst / f)) for f in TOKENIZER_FILES if (src / f).is_file()]
    if not copied:
        raise ValueError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    return copied


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1234' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)
