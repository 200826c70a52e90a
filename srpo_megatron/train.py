"""``srpo-train``: SRPO training, launched by torchrun on 1..N nodes.

    torchrun --nproc-per-node 8 -m srpo_megatron.train --config configs/qwen3_8b_srpo.yaml \
        model.hf_dir=/ckpt/Qwen3-8B data.train_files=[/data/chemistry/train.json]
    srpo-train --config configs/qwen3_8b_srpo.yaml --dry-run --world-size 8 model.hf_dir=...

``--config`` may be given several times (later files win, e.g. a model config then an algorithm
preset); ``key=value`` overrides come last. ``--dry-run`` validates the config and the layout for
``--world-size`` ranks, builds the model on the meta device, prints the plan and exits, without
torchrun, a GPU or any weights.

A mistake in what the user gave (``UserError``: a config key, a data file and row, the model or
tokenizer directory, a checkpoint, a run directory in use) is one line on stderr from global
rank 0, exit code 2, no traceback; so is a service the run depends on that failed (``ServiceError``:
a rollout engine that died, timed out or refused a call), exit code 3. Anything else is an internal
error with its full traceback.
"""

import argparse
import os
import sys
import time

from srpo_megatron.config import Config, load_config, to_yaml, validate_layout
from srpo_megatron.errors import ServiceError, UserError
from srpo_megatron.runtime.lifetime import die_with_parent
from srpo_megatron.runtime.quiet import silence_known_noise

_REPORT_GRACE_S = 30.0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="srpo-train", description="SRPO training on Megatron-core")
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate, build on meta, print the plan, exit"
    )
    parser.add_argument("--world-size", type=int, default=None, help="ranks to plan for with --dry-run")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="GPU memory to plan for with --dry-run"
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides are key=value")
    return args, overrides


def dry_run(cfg: Config, world_size: int, gpu_memory_gib: float = 80.0) -> None:
    import torch

    from srpo_megatron.models.qwen3.config import Qwen3Arch
    from srpo_megatron.models.qwen3.provider import build_qwen3_model
    from srpo_megatron.runtime.distributed import ParallelLayout, destroy_distributed, init_distributed
    from srpo_megatron.trainer.header import engine_plan
    from srpo_megatron.trainer.memory_plan import memory_plan_lines
    from srpo_megatron.trainer.setup import load_model_config

    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    dp = validate_layout(cfg, world_size, local_world_size)
    hf_config = load_model_config(cfg)
    # A world of one (even under torchrun, whose other ranks have already returned): the full model, on meta.
    from srpo_megatron.runtime.distributed import find_free_port

    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # torchrun's store expects its whole world
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(find_free_port())
    init_distributed(ParallelLayout(), seed=cfg.train.seed)
    try:
        # padded as the trained layout pads: to a multiple of divisor x tp (a world of one has tp 1)
        divisor = cfg.model.make_vocab_size_divisible_by * cfg.model.tp
        with torch.device("meta"):
            model = build_qwen3_model(
                hf_config,
                params_dtype=torch.bfloat16,
                make_vocab_size_divisible_by=divisor,
                init_weights=False,
            )
        total = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    finally:
        destroy_distributed()
    m = cfg.model
    arch = Qwen3Arch.from_hf(hf_config)
    # dense parameters split over tp x pp; experts over ep x tp x pp (ep carved out of dp)
    experts_per_rank = experts / (m.ep * m.tp * m.pp)
    per_rank = (total - experts) / (m.tp * m.pp) + experts_per_rank
    updates = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    expert_parallel = (
        f" (ep {m.ep}: every {m.ep} dp ranks share one copy of the experts, {dp // m.ep} cop{'y' if dp == m.ep else 'ies'})"
        if arch.is_moe
        else ""
    )
    print(to_yaml(cfg))
    print(
        f"plan: world {world_size} = tp {m.tp} x pp {m.pp} x dp {dp}{expert_parallel}\n"
        f"model: {hf_config.get('architectures', ['?'])[0]} {_count_line(cfg, arch, total, experts)}, "
        f"about {per_rank / 1e9:.3f} B per rank; EMA teacher sharded alike\n"
        f"step: {cfg.train.prompts_per_step} prompts x {cfg.rollout.n} rollouts = "
        f"{cfg.train.prompts_per_step * cfg.rollout.n} rollouts, {updates} optimizer step(s) of "
        f"{cfg.train.mini_batch_prompts} prompts, {cfg.train.total_steps} steps\n"
        f"algorithm: {cfg.algorithm.variant}; rollouts: {engine_plan(cfg, local_world_size, on_gpus=True)}\n"
        f"output: {cfg.output_dir}\n"
        + "\n".join(memory_plan_lines(cfg, arch, per_rank, dp, gpu_memory_gib, experts_per_rank))
        + "\ndry run OK"
    )


def _count_line(cfg: Config, arch, total: int, experts: int) -> str:
    """The model's parameters as Megatron holds them (``total``, built on meta): HF's count, plus
    the rows that pad the vocabulary to a multiple of make_vocab_size_divisible_by x tp."""
    from srpo_megatron.models.qwen3.mapping import count_megatron_params
    from srpo_megatron.models.vocab import padded_vocab_size

    m = cfg.model
    hf = count_megatron_params(arch, arch.vocab_size)
    line = f"{total:,} parameters (Megatron, vocab padded for tp {m.tp}) = HF's {hf:,}"
    if total > hf:
        padded = padded_vocab_size(arch.vocab_size, m.tp, m.make_vocab_size_divisible_by)
        tables = "the embedding" if arch.tie_word_embeddings else "the embedding and the output layer"
        line += (
            f" + {total - hf:,} of padding ({arch.vocab_size:,} rows to {padded:,}, a multiple of "
            f"{m.make_vocab_size_divisible_by} x tp {m.tp}, in {tables})"
        )
    if experts:
        line += f"; experts {experts:,} ({experts / total:.1%}), the rest {total - experts:,}"
    return line


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun: die with it
        die_with_parent()
    args, overrides = parse_args(argv)
    silence_known_noise()
    rank_0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            if rank_0:  # under torchrun, one rank plans for all
                dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.gpu_memory_gib)
            return 0
        if rank_0:
            from srpo_megatron.trainer.header import config_line

            print(config_line(args.config, overrides), flush=True)
        _train(cfg)
    except (UserError, ServiceError) as err:
        if not rank_0:
            # Rank 0 reports it: every rank meets the same checks (errors.py), and torchrun stops
            # this rank once rank 0 has exited; exiting first could get rank 0 stopped before it
            # has printed. Still here after the grace time, this rank reports the error itself.
            time.sleep(_REPORT_GRACE_S)
            err = f"(rank {os.environ['RANK']}) {err}"
        print(f"srpo-train: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 3
    return 0


def _train(cfg: Config) -> None:
    from srpo_megatron.runtime.distributed import destroy_distributed
    from srpo_megatron.trainer.loop import train

    try:
        train(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
