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
      rollouts_ahead.pt     async runs (train.async_rollouts): step + 1's rollouts, generated
                            during this step by the weights before it (trainer/rollout_source.py)
      complete.json         the completeness marker, written last: every other file and its size

Atomicity: everything is written under ``step_000004.tmp``; once every rank has finished (a
barrier), rank 0 writes complete.json and renames the directory to ``step_000004``. A rename
within one directory is atomic, so a kill or a full disk at any point leaves either no
``step_000004`` or a complete one; the previous checkpoints are untouched, and only after the new
one exists are the oldest beyond ``keep_last`` deleted, each renamed to ``step_N.deleting`` first
(from that atomic step on it is no checkpoint, whatever a kill during the removal leaves).
``*.tmp`` and ``*.deleting`` leftovers of a killed save are removed at the next save.

Resume verifies before it loads (``verify_checkpoint``: every file of the manifest, with its
size). ``ckpt.resume=auto`` takes the newest intact checkpoint: a broken newer one is named with
its broken file and moved aside (``step_N.broken-<time>``, kept for a look), so the continuation
saves its own step N; the fallback is safe because a resume is exact (the continuation redoes the
lost steps as they were), and metrics.jsonl goes back to the fallback's copy (run_dir.py).
"""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from srpo_megatron.config import Config, to_dict
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.checkpoint import MODEL_DIR, write_meta
from srpo_megatron.runtime.distributed import child_process_env
from srpo_megatron.runtime.progress import opaque_phase

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
TEACHER_PREFIX = "teacher."
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
COMPLETE = "complete.json"
AHEAD_FILE = "rollouts_ahead.pt"


def checkpoint_root(cfg: Config) -> Path:
    return cfg.output_dir / "checkpoints"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint ``path``, naming the file; None if it is whole."""
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} (a save that did not finish, or not a training checkpoint)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{COMPLETE} is damaged ({err})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except ValueError as err:  # same size, other bytes
        return f"trainer_state.json is not valid JSON ({err})"
    return None


def _delete_checkpoint(path: Path) -> None:
    aside = path.with_name(f"{path.name}.deleting")
    os.replace(path, aside)  # atomic: from here on it is no checkpoint
    shutil.rmtree(aside)


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
    cfg: Config,
    step: int,
    actor,
    dataset,
    routing_rng,
    hf_config: dict,
    extra: dict[str, Any],
    ahead: dict | None = None,
) -> Path:
    """Collective: every rank writes its shards and RNG state; rank 0 makes the result visible.

    ``extra``: small JSON-able run state of the loop (wall clock so far, best eval scores).
    ``ahead``: the next step's rollouts of an async run (``RolloutSource.state_dict``), or None."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        for leftover in [*root.glob("*.tmp"), *root.glob("*.deleting")]:
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
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        if ahead is not None:
            torch.save(ahead, tmp / AHEAD_FILE)
        # the completeness marker (list_checkpoints) and the manifest verify_checkpoint checks: last
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[: -cfg.ckpt.keep_last]:
            _delete_checkpoint(old)
    dist.barrier()
    return final


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to resume from (rank 0; see the module docstring): ``ckpt.resume`` = "auto"
    (the newest intact one, if any), "none", or a checkpoint directory (which must be intact)."""
    root = checkpoint_root(cfg)
    if cfg.ckpt.resume == "none":
        return None
    if cfg.ckpt.resume != "auto":
        path = Path(cfg.ckpt.resume)
        problem = verify_checkpoint(path)
        if problem is not None:
            raise UserError(f"ckpt.resume={path}: {problem}")
        step = json.loads((path / "trainer_state.json").read_text())["step"]
        later = [p.name for s, p in list_checkpoints(root) if s > step and p.resolve() != path.resolve()]
        if later:
            raise UserError(
                f"ckpt.resume={path}: {root} holds later checkpoints ({', '.join(later)}) that the "
                "continuation would collide with: move them away, or resume into another log.run_name"
            )
        return path
    broken = []
    for _, path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in broken:
                aside = bad.with_name(f"{bad.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(bad, aside)
                print(f"checkpoint {bad} is broken: {why}; moved aside to {aside}")
            if broken:
                print(f"continuing from {path}, the newest intact checkpoint")
            return path
        broken.append((path, problem))
    if broken:
        raise UserError(
            f"no intact checkpoint to resume from in {root} ("
            + "; ".join(f"{bad.name}: {why}" for bad, why in broken)
            + f"); to start over set another log.run_name or remove {cfg.output_dir}"
        )
    return None


def load_checkpoint(path: Path, cfg: Config, actor, dataset, routing_rng) -> tuple[int, dict[str, Any]]:
    """Restore everything ``save_checkpoint`` wrote; returns (the step it was taken after, extra)."""
    from megatron.core import dist_checkpointing

    state = json.loads((path / "trainer_state.json").read_text())
    saved = state["layout"]
    here = {"tp": cfg.model.tp, "pp": cfg.model.pp, "world_size": dist.get_world_size()}
    if saved != here:
        raise UserError(
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


def load_ahead(path: Path) -> dict | None:
    """The next step's rollouts that ``save_checkpoint`` wrote (async runs), or None."""
    file = path / AHEAD_FILE
    return torch.load(file) if file.is_file() else None


def _load_module(module: torch.nn.Module, state: dict, prefix: str) -> None:
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise UserError(
            f"checkpoint does not match the model: missing {missing}, unexpected {result.unexpected_keys}"
        )


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
