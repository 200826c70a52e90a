"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    <output_dir>/checkpoints/step_000004/
      srpo_meta.json        the model checkpoint's metadata (models/qwen3/checkpoint.py), so
                            ``srpo-convert-ckpt mcore-to-hf`` turns a training checkpoint into HF
      model/                ONE Megatron dist_checkpointing (torch_dist) save of the actor's
                            ``sharded_state_dict()``: {"model": student, "teacher": EMA teacher
                            ("teacher." keys), "optimizer": Megatron optimizer state, "scheduler":
                            the LR schedule (common state)}
      rng/rank_00000.pt     per rank: ``RngState`` (python, numpy, torch (CPU and CUDA), Megatron's
                            RNG tracker, the routing generator)
      teacher_fp32/rank_00000.pt  per rank: the actor's ``state_dict()``, its slices of the EMA
                            teacher's fp32 values (trainer/teacher.py), sharded like the
                            distributed optimizer's state
      trainer_state.json    step, layout, config, and under "shared" the state of the parts that
                            are the same on every rank: the data position, the run clock, the
                            best eval scores within the budgets
      metrics.jsonl         the metrics of steps 1..step (what the run had logged)
      rollouts_ahead.pt     async runs (train.async_rollouts): step + 1's rollouts, generated
                            during this step by the weights before it (trainer/rollout_source.py)
      complete.json         the completeness marker, written last: every other file and its size

``Checkpointer`` saves (``save(step)``, after a step) and loads (``load(path)``, at the start of a
resumed run) that state; each part has ``state_dict`` and ``load_state_dict``. The functions
before it are the file rules, which hold before a run is built (which checkpoint to resume from).

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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from srpo_megatron.config import Config, to_dict
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.checkpoint import MODEL_DIR
from srpo_megatron.runtime.distributed import child_process_env
from srpo_megatron.runtime.progress import opaque_phase
from srpo_megatron.trainer.actor import MegatronActor
from srpo_megatron.trainer.rollout_source import RolloutSource

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"
AHEAD_FILE = "rollouts_ahead.pt"
RNG_DIR = "rng"
TEACHER_FP32_DIR = "teacher_fp32"


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
        json.loads((path / TRAINER_STATE).read_text())
    except ValueError as err:  # same size, other bytes
        return f"{TRAINER_STATE} is not valid JSON ({err})"
    return None


def _delete_checkpoint(path: Path) -> None:
    aside = path.with_name(f"{path.name}.deleting")
    os.replace(path, aside)  # atomic: from here on it is no checkpoint
    shutil.rmtree(aside)


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
        step = json.loads((path / TRAINER_STATE).read_text())["step"]
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


class Stateful(Protocol):
    """A part of the run's state, as torch modules and optimizers have it."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RngState:
    """This rank's random number generators: Python's, numpy's, torch's (CPU and CUDA), Megatron's
    CUDA RNG tracker (dropout in tensor-parallel regions) and ``routing``, the generator of the
    routing's random choices (``route_rollouts``), seeded with ``seed``."""

    def __init__(self, seed: int) -> None:
        self.routing = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "megatron_tracker": get_cuda_rng_tracker().get_states(),
            "routing": self.routing.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
        self.routing.set_state(state["routing"])


class Checkpointer:
    """Saves a run's state after a step and loads it back (collectives: every rank calls them).

    ``actor``: its sharded state goes to ``model/``, its per-rank state to ``teacher_fp32/``.
    ``rng``: to ``rng/``, per rank. ``rollouts``: the batch in hand for the next step, to
    ``rollouts_ahead.pt`` (async runs). ``shared``: the parts that are the same on every rank, by
    name, to trainer_state.json (JSON-able states); they load in this order, before ``rollouts``
    (whose saved batch is drawn again from the dataset's position).
    """

    def __init__(
        self,
        cfg: Config,
        hf_config: dict,
        actor: MegatronActor,
        *,
        rng: RngState,
        rollouts: RolloutSource,
        shared: dict[str, Stateful],
    ) -> None:
        self.cfg = cfg
        self.hf_config = hf_config
        self.actor = actor
        self.rng = rng
        self.rollouts = rollouts
        self.shared = shared

    def save(self, step: int) -> Path:
        """The checkpoint of the run after step ``step``, made visible atomically (the module
        docstring), then the oldest beyond ``ckpt.keep_last`` deleted. Returns its directory."""
        from megatron.core import dist_checkpointing

        root = checkpoint_root(self.cfg)
        final = root / f"step_{step:06d}"
        tmp = root / f"step_{step:06d}.tmp"
        rank = dist.get_rank()
        if rank == 0:
            for leftover in [*root.glob("*.tmp"), *root.glob("*.deleting")]:
                shutil.rmtree(leftover)
            for folder in (MODEL_DIR, RNG_DIR, TEACHER_FP32_DIR):
                (tmp / folder).mkdir(parents=True)
        dist.barrier()

        # one device for every tensor of the save (teacher_offload)
        with (
            self.actor.teacher_on_device(),
            opaque_phase(f"saving checkpoint {final.name}", enabled=rank == 0),
        ):
            dist_checkpointing.save(self.actor.sharded_state_dict(), str(tmp / MODEL_DIR))
        torch.save(self.rng.state_dict(), tmp / _rank_file(RNG_DIR))
        torch.save(self.actor.state_dict(), tmp / _rank_file(TEACHER_FP32_DIR))
        dist.barrier()  # every shard and every per-rank file is on disk

        if rank == 0:
            self.actor.write_model_meta(tmp, self.hf_config, source=f"srpo_megatron training step {step}")
            metrics = self.cfg.output_dir / "metrics.jsonl"
            if metrics.is_file():
                shutil.copy(metrics, tmp / "metrics.jsonl")
            state = {
                "step": step,
                "layout": self._layout(),
                "config": to_dict(self.cfg),
                "shared": {name: part.state_dict() for name, part in self.shared.items()},
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, default=str))
            ahead = self.rollouts.state_dict()
            if ahead is not None:
                torch.save(ahead, tmp / AHEAD_FILE)
            # the completeness marker (list_checkpoints) and the manifest verify_checkpoint checks: last
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))
            os.replace(tmp, final)
            for _, old in list_checkpoints(root)[: -self.cfg.ckpt.keep_last]:
                _delete_checkpoint(old)
        dist.barrier()
        return final

    def load(self, path: Path) -> int:
        """Everything ``save`` wrote to ``path`` (verified by ``find_resume_checkpoint``) back into
        the run's parts; returns the step it was taken after."""
        from megatron.core import dist_checkpointing

        state = json.loads((path / TRAINER_STATE).read_text())
        if "shared" not in state:  # the LR schedule was in trainer_state.json, not in model/
            raise UserError(
                f"checkpoint {path} was written by an earlier srpo_megatron, whose training state does "
                "not resume here. Convert its weights instead (srpo-convert-ckpt mcore-to-hf, then "
                "model.hf_dir=...) and start a new run."
            )
        if state["layout"] != self._layout():
            raise UserError(
                f"checkpoint {path} was written with {state['layout']}, this run is {self._layout()}: "
                "resuming training state across layouts is not supported. Convert its weights instead "
                "(srpo-convert-ckpt mcore-to-hf, then model.hf_dir=...) and start a new run."
            )
        with self.actor.teacher_on_device():
            with opaque_phase(f"loading checkpoint {path.name}", enabled=dist.get_rank() == 0):
                sharded = self.actor.sharded_state_dict(is_loading=True)
                loaded = dist_checkpointing.load(sharded, str(path / MODEL_DIR))
            self.actor.load_sharded_state_dict(loaded)
        self.actor.load_state_dict(torch.load(path / _rank_file(TEACHER_FP32_DIR)))
        for name, part in self.shared.items():
            part.load_state_dict(state["shared"][name])
        self.rng.load_state_dict(torch.load(path / _rank_file(RNG_DIR), weights_only=False))
        step = int(state["step"])
        ahead = path / AHEAD_FILE
        self.rollouts.load_state_dict(torch.load(ahead) if ahead.is_file() else None, step)
        return step

    def _layout(self) -> dict[str, int]:
        return {"tp": self.cfg.model.tp, "pp": self.cfg.model.pp, "world_size": dist.get_world_size()}


def _rank_file(folder: str) -> str:
    return f"{folder}/rank_{dist.get_rank():05d}.pt"


def export_hf(ckpt_dir: Path, out_dir: Path, tokenizer_dir: str | None) -> None:
    """The policy of a training checkpoint as an HF directory, by ``srpo-convert-ckpt mcore-to-hf``.

    A separate process: the converter builds the model as a world of one (TP=1, PP=1), which this
    process, a rank of the training world, cannot be.
    """
    if (out_dir / "model.safetensors.index.json").is_file():
        shutil.rmtree(out_dir)  # our export of an earlier (shorter) run of this output_dir
    command = [sys.executable, "-m", "srpo_megatron.convert_ckpt", "mcore-to-hf"]
    command += ["--mcore-dir", str(ckpt_dir), "--out-dir", str(out_dir)]
    if tokenizer_dir:
        command += ["--tokenizer-dir", str(tokenizer_dir)]
    subprocess.run(command, check=True, env=child_process_env())  # not a rank of this world
    print(f"HF export: {out_dir}")
