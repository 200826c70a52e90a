"""Helpers of the tiny-training tests, in a module of its own so that spawned ranks can import them.

The reward is replaced by a parity rule on the response length (about half the rollouts correct),
so every step has mixed groups and therefore SDPO-routed rollouts, even from a random model.
"""

import re
import subprocess
import sys
from pathlib import Path

import torch

from srpo_megatron.config import load_config
from srpo_megatron.data.rows import save_rows
from srpo_megatron.data.synthetic import make_synthetic_rows
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.models.qwen3.tiny import TinyQwen3Config, TinyQwen3MoeConfig, build_tiny_qwen3
from srpo_megatron.rewards.result import RewardResult
from srpo_megatron.runtime.distributed import get_device


def make_tiny_inputs(root):
    """A tiny random Qwen3 (``model``) and Qwen3-MoE (``moe``: 8 experts, top-2), with the real
    tokenizer, and a few synthetic prompts under ``root``."""
    tokenizer = load_tokenizer()
    shapes = {
        "model": TinyQwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16),
        "moe": TinyQwen3MoeConfig(hidden_size=32, moe_intermediate_size=32, num_hidden_layers=2, head_dim=16),
    }
    for name, shape in shapes.items():
        build_tiny_qwen3(tokenizer, seed=0, config=shape).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    save_rows(make_synthetic_rows(16, seed=0), root / "train.parquet")
    save_rows(make_synthetic_rows(3, seed=0, split="test"), root / "test.parquet")
    return root


def parity_reward(source, *, tool_use_parser):
    return lambda text, ground_truth: RewardResult(
        float(len(text) % 2 == 0), "test: parity of the length", parsed=True
    )


def build_tiny_run(overrides: list[str]):
    """The ``Run`` of ``configs/tiny_cpu.yaml`` + ``overrides`` in this rank (parity reward), its
    engine holding the actor's weights."""
    from srpo_megatron.trainer import rollouts, setup
    from srpo_megatron.trainer.engines import start_engine

    rollouts.get_reward_fn = parity_reward
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    setup.start_distributed(cfg)
    hf_config, tokenizer, dataset = setup.load_run_inputs(cfg)
    run = setup.build_run(cfg, hf_config, tokenizer, dataset, *start_engine(cfg, tokenizer))
    run.weight_sync.sync(run.actor.student, run.hf_config)
    return run


def first_step_rollouts(run):
    """Step 1's rollouts and what the step makes of them: (rows, batch, this data-parallel rank's
    share, routing, advantages)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from srpo_megatron.algorithms import compute_group_advantages, route_rollouts
    from srpo_megatron.trainer import loop, rollouts

    rows, batch, _ = run.rollouts.take(1)
    dp_group = ps.get_data_parallel_group()
    mine = loop._my_share(len(batch), dist.get_world_size(dp_group), dist.get_rank(dp_group))
    rewards, _ = rollouts.compute_rewards(batch, rows, run.tokenizer, run.cfg.reward.tool_use_parser)
    group_ids = torch.tensor(batch.prompt_index)
    routing = route_rollouts(rewards, group_ids, run.cfg.algorithm, generator=run.rng.routing)
    advantages = compute_group_advantages(rewards, group_ids, std_norm=run.cfg.algorithm.adv_std_norm)
    return rows, batch, mine, routing, advantages


def train_in_ranks(overrides: list[str], check_export: bool = False, poison_loss: bool = False):
    from srpo_megatron.trainer import actor, loop, rollouts
    from srpo_megatron.trainer.step_batch import Sequences

    rollouts.get_reward_fn = parity_reward
    if poison_loss:  # every loss becomes NaN, and so every gradient
        compute = actor.compute_srpo_loss

        def nan_loss(*args, **kwargs):
            loss, metrics = compute(*args, **kwargs)
            return loss * float("nan"), metrics

        actor.compute_srpo_loss = nan_loss
    cfg = load_config(["configs/tiny_cpu.yaml"], overrides)
    result = loop.train(cfg)
    # the actor's log-probs of a few sequences (collective), for the HF export check below
    prompts, responses = [[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13]]
    micro_batches = result.actor.micro_batches(Sequences.build(prompts, responses, pad_id=0).to(get_device()))
    stats = result.actor.forward(micro_batches, teacher=False)  # None off the last pipeline stage
    actor_logp = torch.cat([s.logp for s in stats]) if stats is not None else None
    if torch.distributed.get_rank() != 0:
        return None
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir).state_dict()
    now = result.engine.model.state_dict()  # the engine holds the trained weights (synced)
    unchanged = [k for k in start if torch.equal(start[k].to(now[k].dtype), now[k])]
    out = {"changed": len(start) - len(unchanged), "total": len(start), "unchanged": unchanged}
    if check_export:
        exported = AutoModelForCausalLM.from_pretrained(cfg.output_dir / "hf").eval()
        hf_logp = []
        for p, r in zip(prompts, responses, strict=True):
            logits = exported(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]  # positions predicting r
            hf_logp.append(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
        out["export_gap"] = (torch.cat(hf_logp) - actor_logp).abs().max().item()
    return out


def train_with_sglang_in_ranks(overrides: list[str]):
    """A tiny training whose rollouts come from SGLang stand-in servers (``rollout.engine=sglang``);
    returns the last step's metrics on rank 0."""
    from srpo_megatron.trainer import loop, rollouts

    rollouts.get_reward_fn = parity_reward
    result = loop.train(load_config(["configs/tiny_cpu.yaml"], overrides))
    return result.metrics if torch.distributed.get_rank() == 0 else None


class CannedEngine:
    """Answers every sample of every prompt with the same response ids (evaluation tests)."""

    def __init__(self, response_ids: list[int]):
        self.response_ids = response_ids

    def generate(self, prompt_ids, params, on_done=None):
        from srpo_megatron.rollout.engine import RolloutBatch

        index = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        if on_done is not None:
            on_done(len(index))
        return RolloutBatch(
            prompt_index=index,
            prompt_ids=[list(prompt_ids[i]) for i in index],
            response_ids=[list(self.response_ids) for _ in index],
            rollout_logp=[torch.zeros(len(self.response_ids)) for _ in index],
            finish_reasons=["stop"] * len(index),
        )


def evaluate_in_rank(overrides: list[str], parsers: list[str], prompts, response_ids: list[int]) -> dict:
    """{parser: evaluate's metrics with reward.tool_use_parser=parser}, every sample answered alike."""
    from srpo_megatron.data.tokenizer import load_tokenizer
    from srpo_megatron.trainer.evaluation import evaluate

    tokenizer, engine = load_tokenizer(), CannedEngine(response_ids)
    return {
        parser: evaluate(
            engine,
            load_config(["configs/tiny_cpu.yaml"], [*overrides, f"reward.tool_use_parser={parser}"]),
            tokenizer,
            prompts,
            [],
            seed=0,
        )
        for parser in parsers
    }


def start_killable_run(fn_name: str, overrides: list[str], world_size: int) -> subprocess.Popen:
    """``run_distributed(<tiny_training.fn_name>, ...)`` in a process group of its own (driver, ranks
    and the servers they launch), so one killpg from the test takes all of it."""
    here = Path(__file__).parent
    script = (
        f"import sys; sys.path.insert(0, {str(here)!r})\n"
        f"from tiny_training import {fn_name}\n"
        "from srpo_megatron.runtime.launch import run_distributed\n"
        "if __name__ == '__main__':\n"
        f"    run_distributed({fn_name}, world_size={world_size}, megatron=False, args=({overrides!r},), timeout=600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=here.parents[1],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class ServerLog:
    """What a real server logged (from byte ``start`` of its log on): its HTTP requests (uvicorn's
    access lines) and the weight-update groups its ranks joined."""

    def __init__(self, log_path: Path, start: int = 0):
        self.path = log_path
        self.start = start

    @classmethod
    def from_now(cls, log_path: Path) -> "ServerLog":
        """What a shared server logs from now on."""
        return cls(log_path, log_path.stat().st_size)

    def text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    def routes(self) -> list[str]:
        """``POST /generate`` -> ``generate``, in order: the 200s of POST requests but the server's
        own ``freeze_gc`` after its start."""
        return [r for r in re.findall(r'"POST /(\w+) HTTP/1\.1" 200', self.text()) if r != "freeze_gc"]

    def joined_groups(self) -> list[str]:
        return re.findall(r"init custom process group: .*group_name=(\S+),", self.text())
