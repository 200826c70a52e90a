"""Synchronous vs one-step-off-policy rollouts (``train.async_rollouts``), in one run on CPU: the same
tiny training twice, one training process and one engine process (the SGLang stand-in, launched
disaggregated by the trainer), each on one thread, so generation and training can overlap on two
cores.

The tiny random Qwen3 of the tests (hidden 32, 2 layers, the real 151,936-token vocabulary), the
tests' parity reward (about half the rollouts correct, so every step routes to both losses);
the config makes generation most of a synchronous step (long responses, many samples, one
optimizer update per step). The step time is the median ``time/total`` over steps 2..N-1: the
first async step has nothing in hand and generates as a synchronous one does, and the last submits
no generation, so it only trains. The reward is the mean ``reward_mean`` of the last
``--reward-steps`` steps of each run, after the same number of steps.

Prints the figures; the last line is one JSON object (``step_time_ratio`` = async / sync). The defaults
take about 4 min here; two runs: sync 12.1 s/step (generation 65%), async 7.9 s, ratio 0.65 (no
other work on the cores); ratio 0.83 at a load average of 2.5 (other work shrinks the overlap).

    python benchmarks/async_overlap.py [--steps 8 --prompts 4 --n 8 --max-new-tokens 24]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core each: the trainer, the engine

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "trainer"))  # the tiny-training helpers
from tiny_training import make_tiny_inputs, train_with_sglang_in_ranks  # noqa: E402

from srpo_megatron.runtime.launch import run_distributed  # noqa: E402

STANDIN = "srpo_megatron.testing.fake_sglang_server"


def run(root: Path, out: Path, args, async_rollouts: bool) -> list[dict]:
    overrides = [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        "data.test_files=[]",
        "model.tp=1",
        "rollout.engine=sglang",
        "rollout.mode=disaggregated",
        f"rollout.server_module={STANDIN}",
        "rollout.startup_timeout_s=300",
        "rollout.deterministic=true",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"train.total_steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        f"train.mini_batch_prompts={args.prompts}",
        "train.micro_batch_tokens=4096",
        "algorithm.topk=8",
        f"train.async_rollouts={str(async_rollouts).lower()}",
        "ckpt.save_every=0",
        "ckpt.export_hf=false",
        f"log.output_dir={out}",
        "log.tensorboard=false",
    ]
    run_distributed(train_with_sglang_in_ranks, world_size=1, megatron=False, args=(overrides,), timeout=1800)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict], reward_steps: int) -> dict[str, float]:
    later = records[1:-1]
    return {
        "step_s": statistics.median(r["time/total"] for r in later),
        "rollout_s": statistics.median(r["time/rollout"] + r.get("time/rollout_wait", 0.0) for r in later),
        "reward": statistics.fmean(r["reward_mean"] for r in records[-reward_steps:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--reward-steps", type=int, default=4)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the step time is the median of steps 2..N-1)")
    load_at_start = os.getloadavg()[0]  # other work on the 2 cores slows both runs, and the overlap
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_inputs(Path(tmp))
        sync = summary(run(root, Path(tmp) / "sync", args, async_rollouts=False), args.reward_steps)
        ahead_records = run(root, Path(tmp) / "async", args, async_rollouts=True)
        ahead = summary(ahead_records, args.reward_steps)
    staleness = [r["rollout/staleness"] for r in ahead_records]
    result = {
        "steps": args.steps,
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "sync_step_s": round(sync["step_s"], 3),
        "async_step_s": round(ahead["step_s"], 3),
        "step_time_ratio": round(ahead["step_s"] / sync["step_s"], 3),
        "sync_generation_fraction": round(sync["rollout_s"] / sync["step_s"], 3),
        "async_wait_s": round(ahead["rollout_s"], 3),
        "sync_reward": round(sync["reward"], 4),
        "async_reward": round(ahead["reward"], 4),
        "async_staleness": staleness,
        "load_1min_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"step time (median of steps 2..{args.steps - 1}): sync {result['sync_step_s']} s (generation "
        f"{result['sync_generation_fraction']:.0%} of it), async {result['async_step_s']} s (waiting "
        f"{result['async_wait_s']} s for the next batch), ratio {result['step_time_ratio']}"
    )
    print(
        f"reward_mean, last {args.reward_steps} of {args.steps} steps: sync {result['sync_reward']}, "
        f"async {result['async_reward']}; async staleness per step {staleness}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
