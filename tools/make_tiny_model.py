"""Make the tiny starting checkpoint of the CPU run: a random tiny Qwen3 + the format warm-up.

    python tools/make_tiny_model.py --out-dir outputs/tiny_qwen3 --seed 0
    python tools/make_tiny_model.py --out-dir outputs/tiny_qwen3_moe --seed 0 --moe   # Qwen3-MoE

Saves an HF folder (config, safetensors weights, the Qwen3 tokenizer files) plus warmup.json with
the warm-up losses, time and the format/accuracy figures of temperature-1 and greedy sampling on
synthetic test prompts. Same arguments -> bitwise the same weights (on the same machine/threads).
"""

import argparse
import json
import time
from pathlib import Path

from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.format_warmup import WarmupConfig, evaluate_format, format_warmup
from srpo_megatron.models.qwen3.tiny import TinyQwen3MoeConfig, build_tiny_qwen3


def main(argv: list[str] | None = None) -> dict:
    defaults = WarmupConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--teacher-fraction", type=float, default=defaults.teacher_fraction)
    parser.add_argument("--eval-prompts", type=int, default=128, help="0 skips the evaluation")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the offline Qwen3 one)")
    parser.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE (8 experts, top-2) instead")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    model = build_tiny_qwen3(tokenizer, args.seed, TinyQwen3MoeConfig() if args.moe else None)
    config = WarmupConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        teacher_fraction=args.teacher_fraction,
    )
    print(
        f"making {args.out_dir} (once): a random tiny Qwen3{'-MoE' if args.moe else ''}, then a format "
        f"warm-up of {config.steps} steps "
        f"x {config.batch_size} (about 150 s on 2 cores)",
        flush=True,
    )
    start = time.perf_counter()
    losses = format_warmup(model, tokenizer, config, progress=True)
    seconds = time.perf_counter() - start
    report = {
        "warmup": vars(config),
        "seconds": round(seconds, 1),
        "final_loss": losses[-1] if losses else None,
    }
    if args.eval_prompts:
        for name, temperature in (("sample_t1", 1.0), ("greedy", 0.0)):
            report[name] = evaluate_format(
                model, tokenizer, args.eval_prompts, seed=args.seed, temperature=temperature
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    (args.out_dir / "warmup.json").write_text(json.dumps({**report, "losses": losses}, indent=1))
    print(
        f"warm-up: {config.steps} steps x {config.batch_size} in {seconds:.1f} s, final loss {report['final_loss']}"
    )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
