"""Measured peak activation memory of a Qwen3-shaped Megatron model on CPU, against the prediction of
``srpo_megatron/trainer/memory_plan.py`` for the same shape, per recompute mode, sequence parallel
off and on.

    .venv/bin/python benchmarks/activation_memory.py       # 10 modes; 10 min on 2 cores shared with other work
    .venv/bin/python benchmarks/activation_memory.py --layers 2 --rows 2 --seq-len 512 --modes none full_uniform_1
    python benchmarks/activation_memory.py --device cuda --hidden 4096   # one GPU (scripts/gpu_check.py)

Model: Megatron's GPTModel with the local spec (the spec that runs on CPU; the TE spec the GPU plan
assumes cannot run here), Qwen3's layer (RMSNorm, q/k norms, GQA, RoPE, SwiGLU), scaled down:
hidden 512, 8 heads over 2 KV heads of 64, FFN 1536, 4 layers, vocabulary 32,000, fp32, TP=2 on
2 gloo processes. One training pass: forward with the actor's output hook (the fused vocab op on
the scored hidden states, gathered first under sequence parallelism: log-probs of the targets and
at 100 ids per token), backward of their sum. Default micro-batch: 4 rows of 1,024 tokens.

``--device cuda``: one process on one GPU, TP=1 (so no sequence parallelism), bf16, and the peak of
torch's caching allocator (``torch.cuda.max_memory_allocated``) above what is allocated right
before the measured pass: the local spec's terms of the plan on the GPU's own kernels.

Measurement on CPU, per rank: the kernel's high-water mark of the resident set (``VmHWM``), reset right
before the measured pass (``/proc/self/clear_refs``), minus the resident set then. Everything a
pass allocates once and keeps (the parameters' gradients, Megatron's sequence-parallel gather
buffer, gloo's buffers) exists already: one unmeasured pass of the same shape runs first, and the
prediction leaves the persistent buffer out likewise. glibc returns every block of 64 KiB and more
to the kernel when it is freed (``mallopt(M_MMAP_THRESHOLD)``), so the figure follows the live
tensors. The figure is the larger of the two ranks. Benchmarks print figures: nothing here asserts
a time or a size. The last line is one JSON object: predicted and measured MiB per mode, and their
ratio.
"""

import argparse
import ctypes
import gc
import json

import torch
import torch.distributed as dist

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.trainer.memory_plan import ActivationShape, Recompute, activation_terms

TOPK = 100
MIB = 2**20
MODES = {
    "none": Recompute(),
    "selective_core_attn": Recompute("selective", modules=("core_attn",)),
    "selective_core_attn_mlp": Recompute("selective", modules=("core_attn", "mlp")),
    "full_uniform_1": Recompute("full", "uniform", 1),
    "full_block_2": Recompute("full", "block", 2),
}


def _hf_config(args) -> dict:
    return dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _tp(args) -> int:
    return 1 if args.device == "cuda" else 2


def _training_pass(model, tokens, targets, gather_ids, vocab, chunk_tokens) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from srpo_megatron.ops import vocab_parallel_token_stats

    group = parallel_state.get_tensor_model_parallel_group()

    def hook(*, hidden_states, output_layer, config, **_):
        if config.sequence_parallel:  # as trainer/actor.py does
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=group
            )
        hidden = hidden_states.transpose(0, 1).flatten(0, 1)  # [B*S, H], every position scored
        weight = output_layer.weight  # [V/tp, H]
        return vocab_parallel_token_stats(
            hidden,
            weight,
            vocab_start=dist.get_rank(group) * weight.shape[0],
            true_vocab_size=vocab,
            targets=targets,
            gather_ids=gather_ids,
            group=group,
            chunk_size=chunk_tokens,
        )

    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    stats = model(tokens, position_ids, None, output_processor=hook)
    (stats.logp.sum() + stats.gathered_logp.sum()).backward()


def measure_modes(args, settings: list[tuple[str, bool]]) -> list[int]:
    """Peak bytes above the pre-pass resident set, per (mode, sequence parallel), on this rank."""
    from srpo_megatron.config import ModelConfig
    from srpo_megatron.models.qwen3.provider import build_qwen3_model
    from srpo_megatron.trainer.actor import megatron_memory_settings

    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
        m_mmap_threshold = -3  # glibc's mallopt parameter
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 64 * 1024)
    g = torch.Generator().manual_seed(0)  # the same inputs on both ranks
    num_tokens = args.rows * args.seq_len
    tokens = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=g).to(args.device)
    targets = torch.randint(0, args.vocab, (num_tokens,), generator=g).to(args.device)
    gather_ids = torch.randint(0, args.vocab, (num_tokens, TOPK), generator=g).to(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    peaks = []
    for mode, sp in settings:
        rc = MODES[mode]
        model_cfg = ModelConfig(
            tp=_tp(args),
            sequence_parallel=sp,
            recompute_granularity=rc.granularity,
            recompute_method=rc.method,
            recompute_num_layers=rc.num_layers,
            recompute_modules=list(rc.modules),
        )
        model = build_qwen3_model(
            _hf_config(args),
            params_dtype=dtype,
            transformer_impl="local",
            bf16=cuda,
            **megatron_memory_settings(model_cfg),
        )
        model.train()
        for param in model.parameters():  # gradients exist before the measured pass
            param.grad = torch.zeros_like(param)
        _training_pass(model, tokens, targets, gather_ids, args.vocab, args.chunk_tokens)  # warm-up
        gc.collect()
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _training_pass(model, tokens, targets, gather_ids, args.vocab, args.chunk_tokens)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # VmHWM := VmRSS
            before = _memory_kib("VmRSS")
            _training_pass(model, tokens, targets, gather_ids, args.vocab, args.chunk_tokens)
            peaks.append((_memory_kib("VmHWM") - before) * 1024)
        dist.barrier()
        del model
        gc.collect()
    return peaks


def predicted_bytes(args, mode: str, sp: bool) -> float:
    shape = ActivationShape(
        hidden=args.hidden,
        ffn=3 * args.hidden,
        heads=8,
        kv_heads=2,
        head_dim=64,
        layers=args.layers,
        padded_vocab=-(-args.vocab // (128 * _tp(args))) * 128 * _tp(args),
        tp=_tp(args),
        sequence_parallel=sp,
        tokens=args.rows * args.seq_len,
        seq_len=args.seq_len,
        scored_tokens=args.rows * args.seq_len,
        chunk_tokens=args.chunk_tokens,
        dtype_bytes=2 if args.device == "cuda" else 4,
        spec="local",
    )
    terms = activation_terms(shape, MODES[mode])
    terms.pop("sp_gather_buffer", None)  # allocated by the warm-up pass, like the measurement's
    return sum(terms.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4, help="sequences in the micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    tp, dtype = _tp(args), "bf16" if args.device == "cuda" else "fp32"
    settings = [(mode, sp) for sp in ((False, True) if tp > 1 else (False,)) for mode in args.modes]
    print(
        f"Qwen3-shaped GPTModel (local spec), h={args.hidden}, {args.layers} layers, 8 heads / 2 kv x 64, "
        f"ffn {3 * args.hidden}, V={args.vocab}, {dtype}, TP={tp} on {args.device}; micro-batch {args.rows} x {args.seq_len} "
        f"tokens, forward + backward",
        flush=True,
    )
    per_rank = run_distributed(
        measure_modes, world_size=tp, layout=ParallelLayout(tp=tp), args=(args, settings), timeout=1800
    )
    rows = []
    for i, (mode, sp) in enumerate(settings):
        measured = max(peaks[i] for peaks in per_rank) / MIB
        predicted = predicted_bytes(args, mode, sp) / MIB
        rows.append(
            {
                "mode": mode,
                "sequence_parallel": sp,
                "predicted_mib": round(predicted, 1),
                "measured_mib": round(measured, 1),
                "ratio": round(predicted / measured, 3),
            }
        )
        print(
            f"{mode:24s} sp={'on ' if sp else 'off'}  predicted {predicted:8.1f} MiB  measured {measured:8.1f} MiB"
            f"  predicted/measured {predicted / measured:.3f}",
            flush=True,
        )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(
        json.dumps(
            {
                "hidden": args.hidden,
                "layers": args.layers,
                "tokens": args.rows * args.seq_len,
                "seq_len": args.seq_len,
                "tp": tp,
                "device": args.device,
                "dtype": dtype,
                "max_abs_error": round(worst, 3),
                "modes": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
