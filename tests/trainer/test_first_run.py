"""What a new user sees: a 2-step tiny training through the real launcher (torchrun, 2 ranks), with
the reference tool-use parser and tool-use prompts in the data. Its stderr holds no third-party
warning; its stdout starts with the header, once (rank 0); wandb receives the resolved config."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from srpo_megatron.data.rows import PromptRow, save_rows

ROOT = Path(__file__).resolve().parents[2]
KNOWN_NOISE = (
    "GPTModel IS DEPRECATED",
    "MimoModelConfig is experimental",
    "past_key_values",
    "No CUDA runtime is found",
    "CUDA_DEVICE_MAX_CONNECTIONS",
)
FAKE_WANDB = """
import json, os

class _Run:
    def log(self, record, step):
        pass

    def finish(self):
        pass

def init(project, name, config):
    with open(os.environ["FAKE_WANDB_OUT"], "w") as f:
        json.dump({"project": project, "name": name, "config": config}, f, default=str)
    return _Run()
"""


def tool_use_rows(n: int) -> list[PromptRow]:
    calls = json.dumps([{"Action": "getThing", "Action_Input": '{"id": 1}'}])
    return [PromptRow("tooluse", [{"role": "user", "content": f"Get thing {i}"}], calls) for i in range(n)]


def test_first_run_is_quiet_and_starts_with_the_header(tiny_run_inputs, tmp_path):
    root = tiny_run_inputs
    save_rows(tool_use_rows(4), tmp_path / "tooluse.jsonl")
    (tmp_path / "fake_wandb").mkdir()
    (tmp_path / "fake_wandb" / "wandb.py").write_text(FAKE_WANDB)
    overrides = [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'},{tmp_path / 'tooluse.jsonl'}]",
        f"data.test_files=[{root / 'test.parquet'}]",
        "eval.n_samples=2",
        "rollout.max_new_tokens=6",
        "train.total_steps=2",
        "reward.tool_use_parser=reference",
        f"log.output_dir={tmp_path / 'run'}",
        "log.tensorboard=false",
        "log.wandb_project=first-run",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake_wandb"), os.environ.get("PYTHONPATH", "")]),
        "FAKE_WANDB_OUT": str(tmp_path / "wandb.json"),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "srpo_megatron.train", "--config", "configs/tiny_cpu.yaml", *overrides]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-4000:]

    for noise in KNOWN_NOISE:
        assert noise not in out.stderr and noise not in out.stdout, noise
    # nor any other Python warning, or a line of torch's logger (W1201 12:00:00.000 ...)
    assert "Warning" not in out.stderr, out.stderr[-4000:]
    assert not re.search(r"^[WE]\d{4} ", out.stderr, re.MULTILINE), out.stderr[-4000:]

    header = (
        "config: configs/tiny_cpu.yaml; overrides: model.hf_dir=",
        "data: 20 rows from 2 file(s); kept 20 prompts",
        "layout: world 2 = tp 2 x pp 1 x dp 1; rollouts: the HF engine on global rank 0",
        "parameters (vocabulary 151,936 padded to 152,064 for tp 2), float32",
        "rewards: synthetic_mcq (16 prompts) -> score_science_mcq; tooluse (4 prompts) -> score_tool_use; "
        "tool-use parser: reference",
        f"run: srpo, 2 steps x 8 prompts x 8 rollouts; output: {tmp_path / 'run'}; start: fresh (no checkpoint",
    )
    lines = out.stdout.splitlines()
    for i, expected in enumerate(header):
        assert sum(expected in line for line in lines) == 1, (expected, out.stdout[:3000])
        assert expected in lines[i], (i, expected, lines[i])  # the first lines, in this order
    # progress of the long phases (outside a terminal rich writes each bar once, at its end)
    assert re.search(r"evaluation, avg@2 on 3 prompts .* 6/6 ", out.stdout)  # the HF engine's samples
    assert "saving checkpoint step_000002" in out.stdout
    assert "exporting HF tensors" in out.stdout
    # each step's line shows the branches' token shares; an evaluation's result follows its step's
    # line, and the run's last lines repeat the final one after the reward's trend
    assert re.search(r"^step 2/2 .*  grpo_tok [\d.e-]+  sdpo_tok [\d.e-]+  ", out.stdout, re.MULTILINE)
    result = r"avg@2 \d\.\d{3}, format_rate \d\.\d{3}, best within 1h \d\.\d{3}, best within 5h"
    assert re.search(rf"^eval after step 2: {result}", out.stdout, re.MULTILINE), out.stdout[-3000:]
    (final,) = [i for i, line in enumerate(lines) if line.startswith("final eval: ")]
    assert re.match(result, lines[final].removeprefix("final eval: "))
    assert lines[final - 1].startswith("reward_mean: first 2 steps")

    wandb = json.loads((tmp_path / "wandb.json").read_text())
    assert wandb["project"] == "first-run"
    assert wandb["config"]["reward"]["tool_use_parser"] == "reference"
    assert wandb["config"]["train"]["total_steps"] == 2  # the override, not tiny_cpu.yaml's 60
    assert wandb["config"]["model"]["hf_dir"] == str(root / "model")
