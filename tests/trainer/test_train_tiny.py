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
    save_rows(make_synthetic_rows(3, seed=0, split="test"), root / "test.parquet")
    return root


def _parity_reward(source):
    return lambda text, ground_truth: RewardResult(float(len(text) % 2 == 0), "test: parity of the length")


def _train(overrides: list[str], check_export: bool = False):
    from srpo_megatron.trainer import loop, rollouts
    from srpo_megatron.trainer.batching import build_micro_batches

    rollouts.get_reward_fn = _parity_reward
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    result = loop.train(cfg)
    # the actor's log-probs of a few sequences (collective), for the HF export check below
    prompts, responses = [[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13]]
    micro_batches = build_micro_batches(prompts, responses, pad_id=0, token_budget=64)
    stats = result.actor.score(micro_batches, teacher=False)  # None off the last pipeline stage
    actor_logp = torch.cat([s.logp for s in stats]) if stats is not None else None
    if torch.distributed.get_rank() != 0:
        return None
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir).state_dict()
    now = result.engine.model.state_dict()  # the engine holds the trained weights (synced)
    out = {"changed": sum(not torch.equal(start[k], now[k]) for k in start), "total": len(start)}
    if check_export:
        exported = AutoModelForCausalLM.from_pretrained(cfg.output_dir / "hf").eval()
        hf_logp = []
        for p, r in zip(prompts, responses, strict=True):
            logits = exported(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]  # positions predicting r
            hf_logp.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
        out["export_gap"] = (torch.cat(hf_logp) - actor_logp).abs().max().item()
    return out


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_two_steps(tiny_run_inputs, tmp_path, tp, pp):
    root = tiny_run_inputs
    overrides = [
        f"model.hf_dir={root / 'model'}",
        f"model.tp={tp}",
        f"model.pp={pp}",
        f"data.train_files=[{root / 'train.parquet'}]",
        f"data.test_files=[{root / 'test.parquet'}]" if tp == 2 else "data.test_files=[]",
        "eval.n_samples=2",
        f"ckpt.export_hf={tp == 2}",
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
    out, _ = run_distributed(_train, world_size=2, megatron=False, args=(overrides, tp == 2), timeout=600)
    assert out["changed"] == out["total"]
    if tp == 2:  # the HF export of the trained policy gives the Megatron actor's log-probs
        assert out["export_gap"] < 1e-4

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
    assert ("eval/avg@2" in records[-1]) == (tp == 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
