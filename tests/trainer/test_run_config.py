from pathlib import Path

import pytest

from srpo_megatron.config import load_config, validate_layout

CONFIGS = Path(__file__).parents[2] / "configs"
REQUIRED = ["model.hf_dir=/models/x", "data.train_files=[/data/train.jsonl]"]


@pytest.mark.parametrize("name", ["qwen3_8b_srpo.yaml", "qwen3_4b_srpo.yaml", "qwen3_30b_a3b_srpo.yaml"])
def test_shipped_model_configs_load(name):
    cfg = load_config([CONFIGS / name], REQUIRED)
    assert cfg.algorithm.variant == "srpo" and cfg.optim.lr == 5e-6 and cfg.rollout.n == 8
    assert validate_layout(cfg, world_size=8) == 8 // (cfg.model.tp * cfg.model.pp)


@pytest.mark.parametrize(
    ("preset", "variant", "lr", "mini_batch"),
    [
        ("grpo.yaml", "grpo", 1e-6, 8),
        ("sdpo.yaml", "sdpo", 1e-5, 32),
        ("srpo_no_dw.yaml", "srpo_no_dw", 5e-6, 32),
    ],
)
def test_algorithm_presets_layer_over_a_model_config(preset, variant, lr, mini_batch):
    cfg = load_config([CONFIGS / "qwen3_8b_srpo.yaml", CONFIGS / preset], REQUIRED)
    assert (cfg.algorithm.variant, cfg.optim.lr, cfg.train.mini_batch_prompts) == (variant, lr, mini_batch)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "lrr"),
        ("optim.lr=abc", "optim.lr|lr"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("train.mini_batch_prompts=5", "train.mini_batch_prompts"),
        ("algorithm.variant=ppo", "variant"),
        ("rollout.engine_urls=[http://a:1]", "engine_urls: gives 1 servers for rollout.num_engines=2"),
        ("rollout.verify_sync=true", "verify_sync: reads the engine's tensors in process"),
        ("rollout.mem_fraction=1.5", "rollout.mem_fraction"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, override])


FULL = "model.recompute_granularity=full"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.tp=1"], "model.sequence_parallel: needs model.tp > 1"),  # the 8B config turns it on
        ([FULL, "model.recompute_num_layers=1"], "model.recompute_method: full recompute needs 'uniform'"),
        (
            [FULL, "model.recompute_method=uniform"],
            "model.recompute_num_layers: full recompute needs a number",
        ),
        (
            [FULL, "model.recompute_method=block", "model.recompute_num_layers=0"],
            "needs a number of layers >= 1",
        ),
        (
            ["model.recompute_method=uniform"],
            "model.recompute_method: applies to model.recompute_granularity=full",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_num_layers=2"],
            "model.recompute_num_layers: applies to model.recompute_granularity=full only",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[layernorm]"],
            "recompute_modules",
        ),
        (["model.recompute_granularity=selective", "model.recompute_modules=[]"], "recompute_modules"),
        (["model.recompute_granularity=partial"], "recompute_granularity"),
    ],
)
def test_bad_memory_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, *overrides])


def test_full_recompute_layers_are_checked_against_the_model():
    from srpo_megatron.trainer.setup import load_model_config

    model = [f"model.hf_dir={CONFIGS / 'models' / 'qwen3_8b'}", FULL, "model.recompute_method=block"]
    assert load_model_config(
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, *model, "model.recompute_num_layers=36"])
    )
    too_many = load_config(
        [CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, *model, "model.recompute_num_layers=37"]
    )
    with pytest.raises(ValueError, match="at most the layers per pipeline stage, 36"):
        load_model_config(too_many)


def test_async_rollouts_are_refused_where_nothing_overlaps():
    """Colocated engines (the 8B config) and the HF engine share the training devices / process."""
    with pytest.raises(ValueError, match="train.async_rollouts: colocated engines share the training GPUs"):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "train.async_rollouts=true"])
    with pytest.raises(ValueError, match="train.async_rollouts: the HF engine generates in global rank 0"):
        load_config([CONFIGS / "tiny_cpu.yaml"], ["train.async_rollouts=true"])
    apart = ["rollout.mode=disaggregated", "train.async_rollouts=true"]
    assert load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, *apart]).train.async_rollouts


def test_missing_required_value_is_refused():
    with pytest.raises(ValueError, match="hf_dir|train_files"):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"])


def test_layout_that_does_not_fit_the_world():
    cfg = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], REQUIRED)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        validate_layout(cfg, world_size=6)


def test_expert_parallelism_splits_the_data_parallel_ranks():
    cfg = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "model.ep=3"])
    with pytest.raises(ValueError, match=r"model.ep=3 must divide the data-parallel size"):
        validate_layout(cfg, world_size=8)


def test_engines_must_fit_the_gpus():
    cfg = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "rollout.num_engines=3"])
    with pytest.raises(ValueError, match="12 GPUs, but colocated engines take every training GPU"):
        validate_layout(cfg, world_size=8)
    two_nodes = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "rollout.num_engines=4"])
    with pytest.raises(ValueError, match="launched on global rank 0's node only"):
        validate_layout(two_nodes, world_size=16, local_world_size=8)
    with pytest.raises(ValueError, match="colocated engines need model.pp=1"):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "model.pp=2"])
    apart = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, "rollout.mode=disaggregated"])
    assert validate_layout(apart, world_size=8, local_world_size=8) == 2
    with pytest.raises(ValueError, match="with several nodes start the servers yourself"):
        validate_layout(apart, world_size=16, local_world_size=8)
    urls = ["rollout.mode=disaggregated", "rollout.engine_urls=[http://n2:30000,http://n3:30000]"]
    assert validate_layout(load_config([CONFIGS / "qwen3_8b_srpo.yaml"], [*REQUIRED, *urls]), 16, 8) == 4


def _dry_run(launcher: str, **env):
    """``bash <launcher> --dry-run`` from the repository root; asserts it passed."""
    import os
    import subprocess

    root = CONFIGS.parent
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{root / '.venv' / 'bin'}:{env['PATH']}" if (root / ".venv").is_dir() else env["PATH"]
    out = subprocess.run(
        ["bash", launcher, "--dry-run"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_8b_example_dry_run_on_cpu():
    """The 8B launcher's config, layout (8 ranks) and model (meta device) pass start-up validation."""
    out = _dry_run("examples/run_qwen3_8b_srpo.sh", GPUS_PER_NODE="8")
    assert "plan: world 8 = tp 4 x pp 1 x dp 2" in out.stdout
    # HF Qwen3-8B: 8,190,735,360; at TP 4 the vocabulary pads to 152,064 (+128 rows, embedding and output)
    assert "Qwen3ForCausalLM 8,191,783,936 parameters (Megatron, vocab padded for tp 4)" in out.stdout
    assert "2 SGLang engine(s) x TP 4, launched colocated on GPUs 0-7" in out.stdout
    # bf16 params 2 + fp32 grads 4 + Adam 12 / dp 2 bytes on 8.191e9 / 4 params; the teacher 2 bytes
    # of weights + 4 / dp 2 of fp32 EMA values
    static = "params 3.8 + fp32 grads 7.6 + Adam 11.4 (over dp 2) + EMA teacher 7.6 (weights 3.8, fp32 EMA"
    assert f"memory per GPU while training (estimate, GiB): {static}" in out.stdout
    # Activations (TE, bf16, sequence parallel over 4), bytes per token per layer: fused norm + linear
    # 2 x (2 x 4096 / 4 x 2) + QKV output (1024 + 2 x 256) x 2 + RoPE cos/sin 4 x 128 x 2 + attention
    # output 1024 x 2 + rotated Q, K (1024 + 256) x 2 + lse 8 x 4 + MLP 5 x 3072 x 2 = 47,648; x 36
    # layers x 16,384 tokens = 26.17 GiB, + the final norm's input (32 MiB) and the scored hidden
    # states the fused op saves (128 MiB)
    activations = "activations 26.3 (micro-batch of 16,384 tokens, 36 layers, TE spec, fused attention, "
    assert activations + "sequence parallel on, no recompute)" in out.stdout
    # 2 fp32 chunk buffers + a bf16 copy, 2,048 x 38,016 x 10 B = 0.73 GiB; the weight gradient
    # 38,016 x 4096 x (4 + 2) B = 0.87 GiB; the hidden gradient 16,384 x 4096 x 2 B = 0.125 GiB
    assert "+ vocab op 1.7 (chunks of 2,048 x 38,016" in out.stdout
    assert "= 58.6 of 80 GiB" in out.stdout  # 30.5 + 26.3 + 1.7, unrounded
    assert "actor + teacher 30.5 + the engines' rollout.mem_fraction=0.5 40.0 = 70.5 of 80 GiB" in out.stdout
    # without sequence parallelism the replicated norm inputs cost 4 x as much: 72.2 GiB, still < 80
    assert "memory options, training total: no recompute: 72.2 GiB;" in out.stdout
    assert "WARNING" not in out.stdout
    assert "dry run OK" in out.stdout


def test_8b_async_example_dry_run_on_cpu():
    """The disaggregated async variant: the actor on 4 GPUs, the engines on the other 4."""
    out = _dry_run("examples/run_qwen3_8b_srpo_async.sh", TRAIN_GPUS="4")
    assert "plan: world 4 = tp 4 x pp 1 x dp 1" in out.stdout
    assert "2 SGLang engine(s) x TP 2, launched disaggregated on GPUs 4-7 of rank 0's node" in out.stdout
    assert "async: each step's rollouts generated during the step before" in out.stdout
    # Adam over dp 1: 12 B x 2.048e9 params; selective [core_attn, mlp] recompute
    assert "Adam 22.9 (over dp 1)" in out.stdout and "= 55.8 of 80 GiB" in out.stdout
    # 0.85 x 80 GiB; bf16 weights 2 B x 8.192e9 / engine TP 2
    assert "rollout.mem_fraction=0.85 68.0 of 80 = weights 7.6 (engine TP 2) + KV cache 60.4" in out.stdout
    assert "WARNING" not in out.stdout
    assert "dry run OK" in out.stdout


@pytest.mark.parametrize("key", ["algorithm.kl_coef=0.01", "algorithm.entropy_coef=0.01"])
def test_kl_and_entropy_terms_are_refused_at_start(key):
    # no reference policy and no entropy bonus (the paper trains without them): an unknown key
    with pytest.raises(ValueError, match=key.split("=")[0].split(".")[1]):
        load_config(["configs/tiny_cpu.yaml"], [key])
