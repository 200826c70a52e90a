"""The memory plan of trainer/memory_plan.py on the shipped 8B config: the terms add up, each
memory setting moves the activations the way it should, and a GPU too small is warned about with
the settings that fit (benchmarks/activation_memory.py compares the activations with measurement)."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from srpo_megatron.config import load_config
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.trainer.memory_plan import ActivationShape, Recompute, activation_terms, memory_plan_lines

CONFIGS = Path(__file__).parents[2] / "configs"
NO_RECOMPUTE = Recompute()
PARAMS_PER_RANK = 8_191_783_936 / 4  # Qwen3-8B at TP 4, vocabulary padded


def _lines(gpu_gib, *overrides):
    cfg = load_config(
        [CONFIGS / "qwen3_8b_srpo.yaml"],
        [f"model.hf_dir={CONFIGS / 'models' / 'qwen3_8b'}", "data.train_files=[/d.json]", *overrides],
    )
    arch = Qwen3Arch.from_hf(load_hf_config(cfg.model.hf_dir))
    return memory_plan_lines(cfg, arch, PARAMS_PER_RANK, 2, gpu_gib)


def test_the_training_total_is_the_sum_of_its_terms():
    training = _lines(80)[0]
    names = ["params", "fp32 grads", "Adam", "EMA teacher", "activations", "vocab op"]
    values = [float(re.search(rf"{name} ([\d.]+)", training).group(1)) for name in names]
    total = float(re.search(r"= ([\d.]+) of 80 GiB", training).group(1))
    assert sum(values) == pytest.approx(total, abs=6 * 0.05)  # each term rounded to 0.1
    assert total < 80


def _shape(**changes):
    base = ActivationShape(
        hidden=4096, ffn=12288, heads=32, kv_heads=8, head_dim=128, layers=36, padded_vocab=152064, tp=4,
        sequence_parallel=False, tokens=16384, seq_len=10240, scored_tokens=16384, chunk_tokens=2048,
        dtype_bytes=2, spec="transformer_engine",
    )  # fmt: skip
    return replace(base, **changes)


def test_memory_settings_move_the_activations():
    def layers(recompute=NO_RECOMPUTE, **changes):
        return activation_terms(_shape(**changes), recompute)["layers"]

    plain, sp = layers(), layers(sequence_parallel=True)
    # sequence parallelism splits the 4 replicated [T, h] tensors of a layer (two norm inputs, two
    # normalised inputs): 3/4 of 4 x 4096 x 2 bytes x 16,384 tokens x 36 layers
    assert plain - sp == pytest.approx(0.75 * 4 * 4096 * 2 * 16384 * 36)
    selective_mlp = layers(Recompute("selective", modules=("core_attn", "mlp")))
    full = layers(Recompute("full", "uniform", 1))
    assert full == 36 * 4096 * 2 * 16384  # only each layer's input [T, h]
    assert full < selective_mlp < plain
    # TE's fused attention keeps no scores: recomputing it saves only its fp32 log-sum-exp (8 heads)
    assert plain - layers(Recompute("selective")) == pytest.approx(36 * 8 * 4 * 16384)
    # the local spec's [S, S] scores grow with the row length: 8 heads per rank, the fp32 softmax
    # output and its bf16 copy per token and key, and the [S, S] bool mask of each layer
    local = {s: layers(spec="local", seq_len=s) for s in (1024, 2048)}
    assert local[2048] - local[1024] == pytest.approx(36 * (8 * 1024 * (4 + 2) * 16384 + 2048**2 - 1024**2))


def test_full_block_keeps_the_layers_it_does_not_checkpoint():
    s = _shape()
    per_layer = activation_terms(replace(s, layers=1))["layers"]
    block = activation_terms(s, Recompute("full", "block", 30))["layers"]
    assert block == pytest.approx(30 * 4096 * 2 * 16384 + 6 * per_layer)


def test_a_gpu_too_small_is_warned_about_with_the_settings_that_fit():
    assert not any(line.startswith("WARNING") for line in _lines(80))
    lines = _lines(45)
    (warning,) = [line for line in lines if line.startswith("WARNING")]
    assert "more than --gpu-memory-gib 45" in warning
    fitting = re.findall(r"\(([\d.]+) GiB\)", warning.split("these fit: ")[1])
    options = dict(re.findall(r"([a-z][^:;]*): ([\d.]+) GiB", lines[2].split("training total: ")[1]))
    assert fitting and len(fitting) == sum(float(v) <= 45 for v in options.values())
    assert all(float(v) <= 45 for v in fitting)
    assert (
        "model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1"
        in warning
    )
