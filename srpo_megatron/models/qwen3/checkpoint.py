"""The Megatron checkpoint of a Qwen3 model: layout, metadata, save and load at any TP/PP.

Layout (written by ``tools/convert_ckpt/hf_to_mcore.py``; the trainer writes the same under each
of its checkpoint directories, next to its optimizer/RNG state)::

    <ckpt_dir>/
      srpo_meta.json   {"format", "hf_config" (config.json dict), "generation_config" | null,
                        "source", "tp", "pp", "ep", "make_vocab_size_divisible_by",
                        "padded_vocab_size", "params_dtype"}
      model/           Megatron dist_checkpointing (torch_dist) of model.sharded_state_dict()

``model/`` is resharded on load by dist_checkpointing, so it loads at any TP/PP (and EP: the
experts are stored one by one under their global indices). The one number
that depends on the saving layout is the padded vocabulary (``padded_vocab_size`` rows of the
embedding / output layer): ``load_divisor`` gives the ``make_vocab_size_divisible_by`` that
reproduces it at another TP size where possible.
"""

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

META_FILE = "srpo_meta.json"
MODEL_DIR = "model"
META_FORMAT = "srpo_megatron.qwen3.mcore/1"


def write_meta(
    ckpt_dir: str | Path,
    *,
    hf_config: dict[str, Any],
    tp: int,
    pp: int,
    make_vocab_size_divisible_by: int,
    ep: int = 1,
    padded_vocab_size: int,
    params_dtype: torch.dtype,
    source: str,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``<ckpt_dir>/srpo_meta.json`` (call on one rank)."""
    meta = {
        "format": META_FORMAT,
        "hf_config": hf_config,
        "generation_config": generation_config,
        "source": source,
        "tp": tp,
        "pp": pp,
        "ep": ep,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "padded_vocab_size": padded_vocab_size,
        "params_dtype": str(params_dtype).removeprefix("torch."),
    }
    path = Path(ckpt_dir) / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint; ValueError if it is not one of ours or is incomplete."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} is not an srpo_megatron Megatron checkpoint: {META_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {META_FORMAT!r}")
    if not (ckpt_dir / MODEL_DIR / "metadata.json").is_file():
        raise ValueError(
            f"incomplete checkpoint {ckpt_dir}: {MODEL_DIR}/metadata.json is missing "
            "(the torch_dist save did not finish)"
        )
    return meta


def params_dtype_of(meta: dict[str, Any]) -> torch.dtype:
    return getattr(torch, meta["params_dtype"])


def load_divisor(meta: dict[str, Any], tp: int) -> int:
    """``make_vocab_size_divisible_by`` that gives the checkpoint's padded vocabulary at ``tp``.

    ValueError when the stored padded size does not split into ``tp`` equal row blocks.
    """
    padded = meta["padded_vocab_size"]
    if padded % tp:
        raise ValueError(f"checkpoint padded vocabulary {padded} is not divisible by TP size {tp}")
    return padded // tp


def save_model(model: torch.nn.Module, ckpt_dir: str | Path) -> Path:
    """Save this rank's model stage into ``<ckpt_dir>/model`` (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_DIR
    if dist.get_rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(model_dir))
    return model_dir


def load_model(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``<ckpt_dir>/model`` into this rank's model stage, resharding as needed (collective).

    ValueError if a tensor the model needs is absent from the checkpoint or a file is unreadable.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    model_dir = Path(ckpt_dir) / MODEL_DIR
    read_meta(ckpt_dir)
    try:
        state = dist_checkpointing.load(
            model.sharded_state_dict(), str(model_dir), strict=StrictHandling.RAISE_UNEXPECTED
        )
    # dist_checkpointing and torch DCP raise many types (DCP's CheckpointException is a BaseException)
    except (Exception, CheckpointException) as e:
        raise ValueError(f"cannot load Megatron checkpoint {model_dir}: {type(e).__name__}: {e}") from e
    # A training checkpoint saves the optimizer, the EMA teacher and the LR schedule in the same
    # torch_dist save (trainer/actor.py); their non-tensor ("common") state comes back next to the
    # model's.
    state = {k: v for k, v in state.items() if k not in ("optimizer", "teacher", "scheduler")}
    result = model.load_state_dict(state, strict=False)
    # Only TE's _extra_state entries may be absent from a checkpoint; a weight never.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Megatron checkpoint {model_dir} does not match the model: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
