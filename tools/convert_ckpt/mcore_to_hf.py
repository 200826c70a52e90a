"""Megatron torch_dist checkpoint (any TP/PP) -> HF Qwen3 directory, on CPU, in one process.

    python tools/convert_ckpt/mcore_to_hf.py --mcore-dir IN --out-dir OUT [--tokenizer-dir DIR]

IN holds srpo_meta.json and model/ (written by hf_to_mcore.py or by the trainer). OUT gets
config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json, generation_config.json
and the tokenizer files when --tokenizer-dir is given; it loads with AutoModelForCausalLM.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU tool (set before torch starts)
# Run from a checkout: use the package next to this script, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> None:
    from srpo_megatron.runtime.quiet import silence_known_noise

    silence_known_noise()  # before megatron-core is imported
    from rich.console import Console

    from srpo_megatron.models.hf_checkpoint import parse_size
    from srpo_megatron.models.qwen3.convert import mcore_to_hf
    from srpo_megatron.runtime.distributed import destroy_distributed

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mcore-dir", required=True, help="checkpoint directory with srpo_meta.json and model/"
    )
    parser.add_argument("--out-dir", required=True, help="HF directory to write")
    parser.add_argument("--tokenizer-dir", help="copy the tokenizer files from here")
    parser.add_argument(
        "--max-shard-size", default="5GiB", help="largest safetensors shard, e.g. 5GiB, 500MB"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    try:
        written = mcore_to_hf(
            args.mcore_dir,
            args.out_dir,
            tokenizer_dir=args.tokenizer_dir,
            max_shard_bytes=parse_size(args.max_shard_size),
            progress=not args.no_progress,
        )
    finally:
        destroy_distributed()
    console = Console(soft_wrap=True)  # one line per file, whatever the width
    console.print(f"wrote HF checkpoint to {args.out_dir}:")
    for path in written:
        console.print(f"  {path}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":  # required: dist_checkpointing starts worker processes with spawn
    main()
