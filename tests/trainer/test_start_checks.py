"""What a run checks at start (trainer/setup.py, trainer/run_dir.py): each bad input is a UserError
naming the key or the file and row, before anything is built."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from srpo_megatron.config import load_config
from srpo_megatron.errors import UserError
from srpo_megatron.trainer.run_dir import lock_run_dir, refuse_to_start_over
from srpo_megatron.trainer.setup import load_run_inputs


def _cfg(root, *overrides):
    base = [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "train.prompts_per_step=2",
        "train.mini_batch_prompts=2",
    ]
    return load_config(["configs/tiny_cpu.yaml"], [*base, *overrides])


def _rows_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ROW = {
    "data_source": "synthetic_mcq",
    "prompt": [{"role": "user", "content": "Pick the marked option: A* B C D"}],
    "reward_model": {"ground_truth": "A"},
}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: [f"model.hf_dir={tmp / 'missing'}"],
            r"config: model.hf_dir=\S*missing: \S*config.json does not exist",
        ),
        (lambda tmp: [f"model.hf_dir={tmp}"], r"config: model.hf_dir=\S*: \S*config.json does not exist"),
        (
            lambda tmp: [f"model.tokenizer_dir={tmp / 'missing'}"],
            r"config: model.tokenizer_dir=\S*missing: no such directory",
        ),
        (
            lambda tmp: ["model.tp=3"],
            r"model.tp=3 / model.pp=1 do not fit model.hf_dir=\S*: TP size 3 does not divide",
        ),
        (
            lambda tmp: ["model.tp=1", "model.ep=2"],
            r"model.ep=2 do not fit \S*: EP size 2 needs a mixture-of-experts model",
        ),
        (
            lambda tmp: ["algorithm.routing_replay=rollout"],
            r"algorithm.routing_replay=rollout replays a mixture-of-experts router; \S* is a dense qwen3",
        ),
        (
            lambda tmp: ["algorithm.routing_replay=always"],
            r"algorithm.routing_replay: Invalid value 'always', expected one of \['none', 'rollout', 'old'\]",
        ),
        (
            lambda tmp: ["train.prompts_per_step=64", "train.mini_batch_prompts=64"],
            r"train.prompts_per_step=64, but data.train_files hold 16 usable",
        ),
    ],
)
def test_bad_model_or_layout_names_the_key(tiny_run_inputs, tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_run_inputs(_cfg(tiny_run_inputs, *make(tmp_path)))


def test_a_moe_model_at_tp_2_needs_sequence_parallelism(tiny_run_inputs):
    with pytest.raises(
        UserError, match=r"mixture-of-experts model at model.tp > 1 needs model.sequence_parallel"
    ):
        load_run_inputs(_cfg(tiny_run_inputs, f"model.hf_dir={tiny_run_inputs / 'moe'}", "model.tp=2"))


def test_a_config_json_without_tokenizer_files_is_refused(tiny_run_inputs, tmp_path):
    # transformers would build a one-token tokenizer from it and train on nothing
    (tmp_path / "config.json").write_text((tiny_run_inputs / "model" / "config.json").read_text())
    with pytest.raises(UserError, match=r"model.hf_dir=\S*: no tokenizer with a chat template"):
        load_run_inputs(_cfg(tiny_run_inputs, f"model.hf_dir={tmp_path}"))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [ROW, {**ROW, "data_source": "chemistyr"}],
            r"train.jsonl, row 2: no reward function for data_source 'chemistyr'",
        ),
        (
            [{**ROW, "prompt": [{"role": "user", "content": ""}]}],
            r"train.jsonl, row 1: .* empty user message",
        ),
    ],
)
def test_bad_rows_name_file_and_row(tiny_run_inputs, tmp_path, records, message):
    path = _rows_file(tmp_path / "train.jsonl", records)
    with pytest.raises(UserError, match=message):
        load_run_inputs(_cfg(tiny_run_inputs, f"data.train_files=[{path}]"))


def test_a_locked_run_directory_names_its_holder_and_is_free_once_it_dies(tmp_path):
    held = lock_run_dir(tmp_path)
    with pytest.raises(
        UserError, match=rf"in use by another trainer \(host {socket.gethostname()}, pid {os.getpid()},"
    ):
        lock_run_dir(tmp_path)
    held.close()
    lock_run_dir(tmp_path).close()  # closed: free again

    # a holder killed with SIGKILL leaves no stale lock: the kernel drops it
    code = (
        "import pathlib\nfrom srpo_megatron.trainer.run_dir import lock_run_dir\n"
        f"held = lock_run_dir(pathlib.Path({str(tmp_path)!r}))\nprint('held', flush=True)\ninput()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"pid {holder.pid},"):
            lock_run_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run_dir(tmp_path).close()


def test_start_over_is_refused_where_a_run_is(tmp_path):
    root = tmp_path / "checkpoints"
    refuse_to_start_over(tmp_path, root)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(
        UserError, match="ckpt.resume=none, but .* holds a run .*metrics.jsonl.*ckpt.resume=auto"
    ):
        refuse_to_start_over(tmp_path, root)


def test_a_tied_moe_model_is_refused_for_sglang(tiny_run_inputs, tmp_path):
    """SGLang 0.5.23's Qwen3MoeForCausalLM never ties lm_head: it would serve an unloaded one."""
    config = json.loads((tiny_run_inputs / "moe" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    overrides = [f"model.hf_dir={tmp_path}", f"model.tokenizer_dir={tiny_run_inputs / 'moe'}", "model.tp=1"]
    with pytest.raises(UserError, match="tied embeddings, which SGLang 0.5.23 cannot serve"):
        load_run_inputs(_cfg(tiny_run_inputs, *overrides, "rollout.engine=sglang"))
