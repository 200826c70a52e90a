"""The first command to run on a lent GPU (scripts/gpu_check.sh): the GPU paths in one short call.

    python scripts/gpu_check.py [--out figures.json]

Parts, each reported under its name in ONE JSON line at the end (``{"skipped": why}`` without CUDA):
  gpu_tests      the ``gpu``-marked tests (pytest -m gpu)
  ops_memory     the fused vocab op against the naive full-vocabulary path at real size: V=151,936,
                 T=8192, H=4096, TP=1, bf16, top-100 + entropy with gradient; peak memory from
                 torch.cuda.max_memory_allocated, and time
  megatron_step  forward + backward + Adam of a Qwen3-8B-width GPTModel with a few layers (bf16, the
                 local spec: the device image has no Transformer Engine), tokens/s and MFU
  tiny_srpo      one bf16 SRPO step of a tiny Qwen3 with the HF engine, on CUDA: the step batch on
                 the device, the passes, the metrics reduced once, weight sync, evaluation
  activation_memory  the memory plan's activation terms (trainer/memory_plan.py, local spec) against
                 the measured peak, per recompute mode, at 8B width (benchmarks/activation_memory.py
                 --device cuda: TP=1, bf16)

``--smoke`` runs every part at toy size on whatever device there is (the CPU test uses it).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))  # tiny_training: the tiny model and data
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM


def gpu_tests(smoke: bool) -> dict:
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if smoke:
        args += ["tests/trainer/test_offload.py"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-300:]]
    return {"exit_code": done.returncode, "summary": tail[0]}


def ops_memory(smoke: bool, device: str) -> dict:
    from srpo_megatron.ops import vocab_parallel_token_stats

    vocab, tokens, hidden_size, topk = (1000, 64, 32, 8) if smoke else (151_936, 8192, 4096, 100)
    torch.manual_seed(0)
    weight = (0.02 * torch.randn(vocab, hidden_size, device=device)).to(torch.bfloat16).requires_grad_()
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def fused():
        s = vocab_parallel_token_stats(
            hidden,
            weight,
            vocab_start=0,
            true_vocab_size=vocab,
            targets=targets,
            topk=topk,
            want_entropy=True,
        )
        return s.logp.sum() + s.topk_logp.sum() + s.entropy.sum()

    def naive():
        logp = (hidden @ weight.T).float().log_softmax(-1)  # [T, V] fp32
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(1, targets[:, None]).sum() + logp.topk(topk, -1).values.sum() + entropy.sum()

    out = {"vocab": vocab, "tokens": tokens, "hidden": hidden_size, "dtype": "bfloat16"}
    for name, loss_fn in (("fused", fused), ("naive", naive)):
        hidden.grad = weight.grad = None
        _sync(device)
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss_fn().backward()
        _sync(device)
        out[f"{name}_s"] = time.perf_counter() - start
        if device == "cuda":
            out[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if device == "cuda":
        out["peak_ratio_fused_over_naive"] = out["fused_peak_gib"] / out["naive_peak_gib"]
    out["time_ratio_fused_over_naive"] = out["fused_s"] / out["naive_s"]
    return out


def megatron_step(smoke: bool) -> dict:
    from srpo_megatron.runtime.launch import run_distributed

    return run_distributed(_megatron_step_rank, world_size=1, args=(smoke,), timeout=540)[0]


def _megatron_step_rank(smoke: bool) -> dict:
    """The actor's configuration: DDP with fp32 gradient reduction, the distributed optimizer, bf16."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    hf_config = json.loads((ROOT / "configs/models/qwen3_8b/config.json").read_text())
    layers, seq, steps = (2, 64, 2) if smoke else (4, 4096, 4)
    if smoke:
        hf_config |= {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
        hf_config |= {"num_key_value_heads": 2, "head_dim": 16}
    hf_config["num_hidden_layers"] = layers
    bf16 = torch.bfloat16
    model = build_qwen3_model(hf_config, params_dtype=bf16, transformer_impl="local", bf16=True)
    params = sum(p.numel() for p in model.parameters())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-5, bf16=True, params_dtype=bf16, use_distributed_optimizer=True
        ),
        [model],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, hf_config["vocab_size"], (1, seq), device=device)
    position_ids = torch.arange(seq, device=device)[None]

    def forward_step(data_iterator, model):
        loss = model(tokens, position_ids, None, labels=tokens)  # [1, S] per-token losses
        return loss, lambda out: (out.float().mean(), {})

    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=1,
        )
        update_ok, _, _ = optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times[1:] or times)  # the first step includes allocator warm-up
    flops = 6 * params * seq  # matmul FLOPs of forward + backward, attention's own not counted
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in _device_name()), None)
    return {
        "layers": layers,
        "seq": seq,
        "params": params,
        "update_ok": bool(update_ok),
        "step_s": best,
        "tokens_per_s": seq / best,
        "mfu": flops / best / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def tiny_srpo(smoke: bool) -> dict:
    from tiny_training import make_tiny_inputs

    from srpo_megatron.runtime.launch import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_inputs(Path(tmp))
        overrides = [
            f"model.hf_dir={root / 'model'}",
            f"data.train_files=[{root / 'train.parquet'}]",
            f"data.test_files=[{root / 'test.parquet'}]",  # evaluated after the step
            "eval.n_samples=2",
            "eval.max_prompts=4",
            "model.dtype=bfloat16",
            "model.tp=1",
            "model.transformer_impl=local",  # the device image has no Transformer Engine
            "train.total_steps=1",
            "train.prompts_per_step=2",
            "train.mini_batch_prompts=2",
            "rollout.n=4",
            "rollout.max_new_tokens=6",
            "algorithm.topk=8",
            "ckpt.export_hf=false",
            f"log.output_dir={root / 'run'}",
            "log.tensorboard=false",
        ]
        start = time.perf_counter()
        metrics = run_distributed(
            _tiny_srpo_rank, world_size=1, megatron=False, args=(overrides,), timeout=540
        )[0]
    keep = (
        *("reward_mean", "loss", "grad_norm", "logp_gap_mean", "logp_gap_max", "teacher_entropy_mean"),
        *("route/sdpo_token_frac", "eval/avg@2", "eval/format_rate", "time/batch", "time/total"),
    )
    return {k: metrics[k] for k in keep} | {"wall_s": time.perf_counter() - start}


def activation_memory(smoke: bool, device: str) -> dict:
    size = ["--hidden", "64", "--layers", "2", "--rows", "1", "--seq-len", "64", "--vocab", "1000"]
    if not smoke:
        size = ["--hidden", "4096", "--layers", "2", "--rows", "2", "--seq-len", "4096", "--vocab", "151936"]
    args = [sys.executable, "benchmarks/activation_memory.py", "--device", device, *size]
    if smoke:
        args += ["--modes", "none"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=540)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_srpo_rank(overrides):
    from tiny_training import parity_reward

    from srpo_megatron.config import load_config
    from srpo_megatron.trainer import loop, rollouts

    rollouts.get_reward_fn = parity_reward
    return loop.train(load_config([str(ROOT / "configs/tiny_cpu.yaml")], overrides)).metrics


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every part at toy size, on any device")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()
    from srpo_megatron.runtime.quiet import silence_known_noise

    silence_known_noise()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    parts = {
        "gpu_tests": lambda: gpu_tests(args.smoke),
        "ops_memory": lambda: ops_memory(args.smoke, device),
        "megatron_step": lambda: megatron_step(args.smoke),
        "tiny_srpo": lambda: tiny_srpo(args.smoke),
        "activation_memory": lambda: activation_memory(args.smoke, device),
    }
    figures: dict = {"device": _device_name(), "torch": torch.__version__, "smoke": args.smoke}
    for name, part in parts.items():
        if not (cuda or args.smoke):
            figures[name] = {"skipped": "no CUDA device"}
            continue
        start = time.perf_counter()
        try:
            figures[name] = part()
        except Exception as err:  # one part failing must not hide the figures of the others
            figures[name] = {"error": f"{type(err).__name__}: {str(err)[-500:]}"}
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    line = json.dumps(figures, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
