"""The memory plan of trainer/memory_plan.py on the shipped 8B config: the terms add up, each
memory setting moves the activations the way it should, and a GPU too small is warned about with
the settings that fit (benchmarks/activation_memory.py compares the activations with measurement).
On the shipped Qwen3-30B-A3B config: the experts' state is sharded over their own data-parallel
size, a MoE layer keeps its routed tokens, and the launcher's dry run prints the count and the plan."""

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


# Qwen3-30B-A3B on the shipped MoE config (TP 4 x EP 2, dp 2): 30,532,646,912 parameters at TP 4
# (vocabulary padded), of which the experts 48 layers x 128 x 3 x 768 x 2048 = 28,991,029,248
EXPERTS = 28_991_029_248
DENSE_TP4 = 30_532_646_912 - EXPERTS


def _moe_lines(gpu_gib, *overrides):
    cfg = load_config(
        [CONFIGS / "qwen3_30b_a3b_srpo.yaml"],
        [f"model.hf_dir={CONFIGS / 'models' / 'qwen3_30b_a3b'}", "data.train_files=[/d.json]", *overrides],
    )
    m = cfg.model
    arch = Qwen3Arch.from_hf(load_hf_config(m.hf_dir))
    dp = 8 // (m.tp * m.pp)
    dense = DENSE_TP4 / (m.tp * m.pp)  # TP 2 pads the vocabulary to the same 152,064 rows
    experts = EXPERTS / (m.ep * m.tp * m.pp)
    return memory_plan_lines(cfg, arch, dense + experts, dp, gpu_gib, experts)


def _gib(line, name):
    return float(re.search(rf"{name} ([\d.]+)", line).group(1))


def test_moe_state_shards_the_experts_over_their_own_data_parallel_size():
    training, experts = _moe_lines(140)[:2]
    dense, mine = DENSE_TP4 / 4, EXPERTS / 8  # per rank: the rest over tp 4, the experts over ep 2 x tp 4
    # Adam: 12 bytes a parameter, the rest's over dp 2, the experts' over dp / ep = 1
    assert _gib(training, "Adam") == pytest.approx((dense * 12 / 2 + mine * 12) / 2**30, abs=0.05)
    assert _gib(training, "fp32 EMA values") == pytest.approx((dense * 4 / 2 + mine * 4) / 2**30, abs=0.05)
    assert _gib(training, "params") == pytest.approx((dense + mine) * 2 / 2**30, abs=0.05)
    # the experts' share: 24 bytes a parameter (2 + 4 + 12 + 2 + 4), none of it sharded further
    assert "= 81.0 of the state's 86.7" in experts and "dp/ep = 2/2 = 1" in experts
    assert _gib(experts, "Adam") == pytest.approx(mine * 12 / 2**30, abs=0.05)
    assert not any(line.startswith("WARNING") for line in _moe_lines(140))
    # without expert parallelism each of the 2 dp ranks holds all the experts: params double, Adam
    # and the EMA values are sharded over dp 2 instead (the same bytes), so the state grows
    no_ep = _moe_lines(140, "model.ep=1")
    assert _gib(no_ep[1], "params") == pytest.approx(2 * _gib(experts, "params"), abs=0.1)
    assert _gib(no_ep[1], "Adam") == pytest.approx(_gib(experts, "Adam"), abs=0.1)


def test_one_copy_of_the_experts_costs_the_same_in_every_layout():
    """ep x tp x pp = 8: the experts' 81.0 GiB per GPU whatever the split; the dense part is what
    TP saves, which is why the config takes TP 4 (and why 80 GB GPUs cannot hold the run)."""
    states = {}
    for tp, ep in ((4, 2), (2, 4)):
        lines = _moe_lines(80, f"model.tp={tp}", f"model.ep={ep}")
        states[tp] = float(re.search(r"of the state's ([\d.]+)", lines[1]).group(1))
        assert "= 81.0 of the state's" in lines[1]
        assert any("the state alone, params + grads + Adam + teacher" in line for line in lines)
    assert states[4] < states[2] < 90


def test_an_offloaded_teacher_is_counted_where_it_comes_back():
    lines = _moe_lines(80, "model.teacher_offload=true")
    training = lines[0]
    assert _gib(training, "EMA teacher") == 0.0 and "= 68.0 of 80 GiB" in training
    (teacher,) = [line for line in lines if line.startswith("memory per GPU while the teacher runs")]
    assert "actor 65.1 + teacher 21.7 (weights 7.5, fp32 EMA values 14.2)" in teacher
    assert lines[-1].startswith(
        "WARNING: memory: the offloaded teacher's forward and EMA update need about 88."
    )


def _moe_shape(**changes):
    # one Qwen3-30B-A3B micro-batch at TP 4 with sequence parallelism, TE spec, bf16
    base = _shape(
        hidden=2048, ffn=6144, heads=32, kv_heads=4, layers=48, sequence_parallel=True, seq_len=10240,
        moe_layers=48, moe_ffn=768, topk=8, num_experts=128,
    )  # fmt: skip
    return replace(base, **changes)


def test_moe_layers_keep_the_routed_tokens():
    moe = activation_terms(_moe_shape())["layers"]
    # per token and layer: norms 2 x 2 x 2048/4 x 2 = 4,096; QKV output (1024 + 2 x 128) x 2, RoPE
    # 4 x 128 x 2, attention output 1024 x 2 = 5,632; rotated Q, K (1024 + 128) x 2 + lse 8 x 4 =
    # 2,336; the experts: 8 routed copies x (the dispatched token 2048 + SwiGLU 6 x 192) x 2 = 51,200,
    # the router's fp32 scores 128 x 4 / 4 = 128
    assert moe == pytest.approx(48 * 16384 * (4096 + 5632 + 2336 + 51200 + 128))
    # Megatron's selective "mlp" recompute leaves MoE layers alone; full recompute keeps their inputs
    assert activation_terms(_moe_shape(), Recompute("selective", modules=("core_attn", "mlp")))["layers"] == (
        pytest.approx(moe - 48 * 16384 * 2336 + 48 * 16384 * (1024 + 128) * 2)  # only core_attn's share
    )
    assert (
        activation_terms(_moe_shape(), Recompute("full", "uniform", 1))["layers"] == 48 * 2048 / 4 * 2 * 16384
    )
    # a stage of dense and MoE layers counts each kind once
    dense_layer = activation_terms(_moe_shape(layers=1, moe_layers=0))["layers"]
    moe_layer = activation_terms(_moe_shape(layers=1, moe_layers=1))["layers"]
    mixed = activation_terms(_moe_shape(layers=4, moe_layers=3))["layers"]
    assert mixed == pytest.approx(dense_layer + 3 * moe_layer)


def test_30b_a3b_example_dry_run_on_cpu():
    """The MoE launcher (8 ranks): HF's parameter count plus the explained padding, the experts'
    share, and the honest verdict on 80 GB GPUs (its config is for 141 GB ones)."""
    from test_run_config import _dry_run

    out = _dry_run("examples/run_qwen3_30b_a3b_srpo.sh", GPUS_PER_NODE="8")
    assert (
        "plan: world 8 = tp 4 x pp 1 x dp 2 (ep 2: every 2 dp ranks share one copy of the experts"
        in out.stdout
    )
    assert (
        "Qwen3MoeForCausalLM 30,532,646,912 parameters (Megatron, vocab padded for tp 4) = HF's "
        "30,532,122,624 + 524,288 of padding (151,936 rows to 152,064, a multiple of 128 x tp 4, "
        "in the embedding and the output layer); experts 28,991,029,248"
    ) in out.stdout
    assert "2 SGLang engine(s) x TP 4, launched colocated on GPUs 0-7" in out.stdout
    assert "full (uniform, 1 layer)) + vocab op 1.2" in out.stdout and "= 89.7 of 80 GiB" in out.stdout
    assert "= 81.0 of the state's 86.7" in out.stdout
    assert "WARNING: memory: training needs about 89.7 GiB per GPU" in out.stdout
    assert "dry run OK" in out.stdout
