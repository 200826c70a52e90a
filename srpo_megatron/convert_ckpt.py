"""srpo-convert-ckpt: HF Qwen3 / Qwen3-MoE <-> Megatron torch_dist checkpoints, any TP/PP/EP, on CPU.

    srpo-convert-ckpt hf-to-mcore --hf-dir IN --out-dir OUT --tp N --pp M [--ep E]
    srpo-convert-ckpt mcore-to-hf --mcore-dir IN --out-dir OUT [--tokenizer-dir DIR]

(or ``python -m srpo_megatron.convert_ckpt ...``; ``tools/convert_ckpt/{hf_to_mcore,mcore_to_hf}.py``
take the same arguments after the command's name). hf-to-mcore spawns N*M*E gloo processes on this
machine, each loading only its slices of the HF tensors (and its experts), and writes OUT/model/ (torch_dist) and
OUT/srpo_meta.json. mcore-to-hf reads such a directory (from hf-to-mcore or a training checkpoint)
in one process and writes config.json, model-0000k-of-0000n.safetensors +
model.safetensors.index.json, generation_config.json and, with --tokenizer-dir, the tokenizer
files: a directory AutoModelForCausalLM loads. Both hide GPUs. The layout and what each step does:
tools/convert_ckpt/README.md; the library: ``models/qwen3/convert.py``.
"""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU tools: gloo ranks, never a GPU (before CUDA starts)
    from srpo_megatron.runtime.quiet import silence_known_noise

    silence_known_noise()  # before megatron-core is imported
    parser = argparse.ArgumentParser(
        prog="srpo-convert-ckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint at TP x PP")
    to_mcore.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors")
    to_mcore.add_argument("--out-dir", required=True, help="checkpoint directory to create")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    to_mcore.add_argument("--ep", type=int, default=1, help="expert-parallel size (Qwen3-MoE)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mcore.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="parameter dtype (default: as stored)"
    )
    to_hf = commands.add_parser("mcore-to-hf", help="Megatron checkpoint of any TP/PP -> HF directory")
    to_hf.add_argument(
        "--mcore-dir", required=True, help="checkpoint directory with srpo_meta.json and model/"
    )
    to_hf.add_argument("--out-dir", required=True, help="HF directory to write")
    to_hf.add_argument("--tokenizer-dir", help="copy the tokenizer files from here")
    to_hf.add_argument("--max-shard-size", default="5GiB", help="largest safetensors shard, e.g. 5GiB, 500MB")
    for command in (to_mcore, to_hf):
        command.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.command == "hf-to-mcore":
            written, what = (
                _hf_to_mcore(args),
                f"Megatron checkpoint (TP={args.tp}, PP={args.pp}, EP={args.ep})",
            )
        else:
            written, what = _mcore_to_hf(args), "HF checkpoint"
    except ValueError as err:  # the converters' errors name the file, tensor or number at fault
        print(f"srpo-convert-ckpt: {err}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(soft_wrap=True)  # one line per file, whatever the width
    console.print(f"wrote {what} to {args.out_dir}:")
    for path in written:
        console.print(f"  {path}  ({path.stat().st_size:,} bytes)")
    return 0


def _hf_to_mcore(args: argparse.Namespace) -> list:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the N*M*E ranks share this machine's cores
    import torch

    from srpo_megatron.models.qwen3.convert import hf_to_mcore

    return hf_to_mcore(
        args.hf_dir,
        args.out_dir,
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        params_dtype=getattr(torch, args.dtype) if args.dtype else None,
        progress=not args.no_progress,
    )


def _mcore_to_hf(args: argparse.Namespace) -> list:
    from srpo_megatron.models.hf_checkpoint import parse_size
    from srpo_megatron.models.qwen3.convert import mcore_to_hf
    from srpo_megatron.runtime.distributed import destroy_distributed

    try:
        return mcore_to_hf(
            args.mcore_dir,
            args.out_dir,
            tokenizer_dir=args.tokenizer_dir,
            max_shard_bytes=parse_size(args.max_shard_size),
            progress=not args.no_progress,
        )
    finally:
        destroy_distributed()


if __name__ == "__main__":  # required: dist_checkpointing's writer and hf-to-mcore's ranks start with spawn
    sys.exit(main())
