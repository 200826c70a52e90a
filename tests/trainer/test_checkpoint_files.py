"""The checkpoint files' rules without a training (trainer/checkpoint.py): deletion is atomic, and
an explicit ``ckpt.resume`` is verified. The runs with real checkpoints: test_reliability.py."""

import json

import pytest

from srpo_megatron.config import load_config
from srpo_megatron.errors import UserError
from srpo_megatron.trainer import checkpoint
from srpo_megatron.trainer.checkpoint import find_resume_checkpoint, list_checkpoints


def _checkpoint(root, step):
    path = root / f"step_{step:06d}"
    (path / "model").mkdir(parents=True)
    (path / "model" / "__0_0.distcp").write_bytes(b"x" * 10)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = {"model/__0_0.distcp": 10, "trainer_state.json": len(json.dumps({"step": step}))}
    (path / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return path


def _cfg(out, resume):
    overrides = [
        "model.hf_dir=unused",
        "data.train_files=[unused]",
        f"log.output_dir={out}",
        f"ckpt.resume={resume}",
    ]
    return load_config(["configs/tiny_cpu.yaml"], overrides)


def test_a_deletion_cut_short_leaves_no_checkpoint(tmp_path, monkeypatch):
    first, second = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)

    def killed_midway(path):  # a kill after the first file went: the marker is still there
        (path / "model" / "__0_0.distcp").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._delete_checkpoint(first)
    assert list_checkpoints(tmp_path) == [(2, second)]


def test_an_explicit_resume_is_verified(tmp_path):
    root = tmp_path / "checkpoints"
    older, newer = _checkpoint(root, 1), _checkpoint(root, 2)
    assert find_resume_checkpoint(_cfg(tmp_path, newer)) == newer
    with pytest.raises(
        UserError, match=r"ckpt.resume=\S+step_000001: \S+ holds later checkpoints \(step_000002\)"
    ):
        find_resume_checkpoint(_cfg(tmp_path, older))
    (newer / "model" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(UserError, match=r"step_000002: model/__0_0.distcp has 1 bytes, 10 were written"):
        find_resume_checkpoint(_cfg(tmp_path, newer))
    assert find_resume_checkpoint(_cfg(tmp_path / "elsewhere", older)) == older  # into another run
