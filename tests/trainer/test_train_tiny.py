"""Two-step tiny trainings through the real pipeline (HF engine, rewards, routing, Megatron actor at
TP=2 and at PP=2, EMA teacher, weight sync) on 2 gloo processes.

The reward is replaced by a parity rule on the response length (about half the rollouts correct),
so every step has mixed groups and therefore SDPO-routed rollouts, even from a random model.
"""

import json

import pytest
import torch

from srpo_megatron.config import load_config
from srpo_megatron.data.rows import save_rows
from srpo_megatron.data.synthetic import make_synthetic_rows
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.data.warmup import TinyQwen3Config, build_tiny_qwen3
from srpo_megatron.rewards.result import RewardResult
from srpo_megatron.runtime.launch import run_distributed


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = load_tokenizer()
    shape = TinyQwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16)
    build_tiny_qwen3(tokenizer, seed=0, config=shape).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_rows(make_synthetic_rows(16, seed=0), root / "train.parquet")
    return root


def _parity_reward(source):
    return lambda text, ground_truth: RewardResult(float(len(text) % 2 == 0), "test: parity of the length")


def _train(overrides: list[str]):
    from srpo_megatron.trainer import loop, rollouts

    rollouts.get_reward_fn = _parity_reward
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    result = loop.train(cfg)
    if torch.distributed.get_rank() != 0:
        return None
    # the engine holds the trained weights: they moved away from the starting checkpoint
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir).state_dict()
    now = result.engine.model.state_dict()
    changed = [k for k in start if not torch.equal(start[k], now[k])]
    return {"changed": len(changed), "total": len(start)}


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_two_steps(tiny_run_inputs, tmp_path, tp, pp):
    root = tiny_run_inputs
    overrides = [
        f"model.hf_dir={root / 'model'}",
        f"model.tp={tp}",
        f"model.pp={pp}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "train.total_steps=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",  # two optimizer steps per training step
        "train.micro_batch_tokens=256",  # several micro-batches per mini-batch
        "rollout.n=4",
        "rollout.max_new_tokens=6",
        "algorithm.topk=8",
        f"log.output_dir={tmp_path}",
        "log.tensorboard=false",
    ]
    weights, _ = run_distributed(_train, world_size=2, megatron=False, args=(overrides,), timeout=600)
    assert weights["changed"] == weights["total"]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in (
            "reward_mean",
            "sdpo_fraction",
            "grpo_fraction",
            "teacher_entropy_mean",
            "response_length_mean",
        ):
            assert key in r
        for phase in ("rollout", "reward", "old_logp", "teacher", "train", "sync", "total"):
            assert r[f"time/{phase}"] >= 0
        # the teacher scored exactly the SDPO-routed rollouts, no more
        assert r["teacher_rollouts"] == r["sdpo_rollouts"] > 0
        assert r["update_ok"] == 1.0 and r["grad_norm"] > 0
        # the engine samples with the trainer's weights (synced after every step)
        assert r["logp_gap_max"] < 1e-4
