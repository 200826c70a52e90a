"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    <output_dir>/checkpoints/step_000004/
      srpo_meta.json        the model checkpoint's metadata (models/qwen3/checkpoint.py), so
                            tools/convert_ckpt/mcore_to_hf.py turns a training checkpoint into HF
      model/                ONE Megatron dist_checkpointing (torch_dist) save of
                            {"model": student, "teacher": EMA teacher ("teacher." keys),
                             "optimizer": Megatron optimizer state}
      rng/rank_00000.pt     per rank: python, numpy, torch (CPU and CUDA), Megatron's RNG tracker,
                            the routing generator
      teacher_fp32/rank_00000.pt  per rank: its slices of the EMA teacher's fp32 values
                            (trainer/teacher.py), sharded like the distributed optimizer's state
      trainer_state.json    step, data position, LR-scheduler state, layout, config
      metrics.jsonl         the metrics of steps 1..step (what the run had logged)

Atomicity: everything is written under ``step_000004.tmp``; once every rank has finished (a
barrier), rank 0 renames it to ``step_000004``. A rename within one directory is atomic, so a
kill or a full disk at any point leaves either no ``step_000004`` or a complete one; the previous
checkpoints are untouched, and only after the new one exists are the oldest beyond ``keep_last``
deleted. ``*.tmp`` leftovers of a killed save are removed at the next save.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from srpo_megatron.config import Config, to_dict
from srpo_megatron.models.qwen3.checkpoint import MODEL_DIR, write_meta
from srpo_megatron.runtime.distributed import child_process_env
from srpo_megatron.runtime.progress import opaque_phase

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
TEACHER_PREFIX = "teacher."
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(cfg: Config) -> Path:
    return cfg.output_dir / "checkpoints"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _sharded_state(actor, *, is_loading: bool) -> dict:
    student = actor.student.sharded_state_dict()
    return {
        "model": student,
        "teacher": actor.teacher.sharded_state_dict(prefix=TEACHER_PREFIX),
        "optimizer": actor.optimizer.sharded_state_dict(
            student, is_loading=is_loading, metadata=_OPTIM_METADATA
        ),
    }


def _rng_state(routing_rng: torch.Generator) -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
        "routing": routing_rng.get_state(),
    }


def _set_rng_state(state: dict[str, Any], routing_rng: torch.Generator) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    routing_rng.set_state(state["routing"])


def save_checkpoint(
    cfg: Config, step: int, actor, dataset, routing_rng, hf_config: dict, extra: dict[str, Any]
) -> Path:
    """Collective: every rank writes its shards and RNG state; rank 0 makes the result visible.

    ``extra``: small JSON-able run state of the loop (wall clock so far, best eval scores)."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        for leftover in root.glob("*.tmp"):
            shutil.rmtree(leftover)
        (tmp / MODEL_DIR).mkdir(parents=True)
        (tmp / "rng").mkdir()
        (tmp / "teacher_fp32").mkdir()
    dist.barrier()

    # one device for every tensor of the save (teacher_offload)
    with actor.teacher_on_device(), opaque_phase(f"saving checkpoint {final.name}", enabled=rank == 0):
        dist_checkpointing.save(_sharded_state(actor, is_loading=False), str(tmp / MODEL_DIR))
    torch.save(_rng_state(routing_rng), tmp / "rng" / f"rank_{rank:05d}.pt")
    torch.save(actor.ema.state_dict(), tmp / "teacher_fp32" / f"rank_{rank:05d}.pt")
    dist.barrier()  # every shard and every RNG file is on disk

    if rank == 0:
        write_meta(
            tmp,
            hf_config=hf_config,
            tp=cfg.model.tp,
            pp=cfg.model.pp,
            make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
            padded_vocab_size=actor.student.vocab_size,
            params_dtype=actor.student.config.params_dtype,
            source=f"srpo_megatron training step {step}",
        )
        metrics = cfg.output_dir / "metrics.jsonl"
        if metrics.is_file():
            shutil.copy(metrics, tmp / "metrics.jsonl")
        state = {
            "step": step,
            "data": dataset.state_dict(),
            "scheduler": actor.scheduler.state_dict(),
            "layout": {"tp": cfg.model.tp, "pp": cfg.model.pp, "world_size": dist.get_world_size()},
            "config": to_dict(cfg),
            "extra": extra,
        }
        # trainer_state.json is what marks a checkpoint complete (list_checkpoints): written last
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[: -cfg.ckpt.keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to resume from: ``ckpt.resume`` = "auto" (newest complete one, if any),
    "none", or a checkpoint directory."""
    if cfg.ckpt.resume == "none":
        return None
    if cfg.ckpt.resume == "auto":
        found = list_checkpoints(checkpoint_root(cfg))
        return found[-1][1] if found else None
    path = Path(cfg.ckpt.resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"ckpt.resume={path}: not a complete training checkpoint (no trainer_state.json)")
    return path


def load_checkpoint(path: Path, cfg: Config, actor, dataset, routing_rng) -> tuple[int, dict[str, Any]]:
    """Restore everything ``save_checkpoint`` wrote; returns (the step it was taken after, extra)."""
    from megatron.core import dist_checkpointing

    state = json.loads((path / "trainer_state.json").read_text())
    saved = state["layout"]
    here = {"tp": cfg.model.tp, "pp": cfg.model.pp, "world_size": dist.get_world_size()}
    if saved != here:
        raise ValueError(
            f"checkpoint {path} was written with {saved}, this run is {here}: resuming training state "
            "across layouts is not supported. Convert its weights instead (tools/convert_ckpt/"
            "mcore_to_hf.py, then model.hf_dir=...) and start a new run."
        )
    with actor.teacher_on_device():
        with opaque_phase(f"loading checkpoint {path.name}", enabled=dist.get_rank() == 0):
            loaded = dist_checkpointing.load(_sharded_state(actor, is_loading=True), str(path / MODEL_DIR))
        _load_module(actor.student, loaded["model"], "")
        _load_module(actor.teacher, loaded["teacher"], TEACHER_PREFIX)
    actor.load_optimizer_state(loaded["optimizer"])
    actor.ema.load_state_dict(torch.load(path / "teacher_fp32" / f"rank_{dist.get_rank():05d}.pt"))
    actor.scheduler.load_state_dict(state["scheduler"])
    dataset.load_state_dict(state["data"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False), routing_rng)
    return int(state["step"]), state["extra"]


def _load_module(module: torch.nn.Module, state: dict, prefix: str) -> None:
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing}, unexpected {result.unexpected_keys}"
        )


def truncate_metrics(cfg: Config, step: int) -> None:
    """Drop metrics lines of steps after ``step`` (logged after the checkpoint, before a crash)."""
    path = cfg.output_dir / "metrics.jsonl"
    if dist.get_rank() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by the crash: nothing after it is trustworthy
    path.write_text("".join(f"{line}\n" for line in kept))


def export_hf(ckpt_dir: Path, out_dir: Path, tokenizer_dir: str | None) -> None:
    """The policy of a training checkpoint as an HF directory, by tools/convert_ckpt/mcore_to_hf.py.

    A separate process: the converter builds the model as a world of one (TP=1, PP=1), which this
    process, a rank of the training world, cannot be.
    """
    import subprocess
    import sys

    tool = Path(__file__).parents[2] / "tools" / "convert_ckpt" / "mcore_to_hf.py"
    if (out_dir / "model.safetensors.index.json").is_file():
        shutil.rmtree(out_dir)  # our export of an earlier (shorter) run of this output_dir
    command = [sys.executable, str(tool), "--mcore-dir", str(ckpt_dir), "--out-dir", str(out_dir)]
    if tokenizer_dir:
        command += ["--tokenizer-dir", str(tokenizer_dir)]
    subprocess.run(command, check=True, env=child_process_env())  # not a rank of this world
    print(f"HF export: {out_dir}")
