from pathlib import Path

import pytest

from srpo_megatron.config import load_config, validate_layout

CONFIGS = Path(__file__).parents[2] / "configs"
REQUIRED = ["model.hf_dir=/models/x", "data.train_files=[/data/train.jsonl]"]


@pytest.mark.parametrize("name", ["qwen3_8b_srpo.yaml", "qwen3_4b_srpo.yaml"])
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


def test_missing_required_value_is_refused():
    with pytest.raises(ValueError, match="hf_dir|train_files"):
        load_config([CONFIGS / "qwen3_8b_srpo.yaml"])


def test_layout_that_does_not_fit_the_world():
    cfg = load_config([CONFIGS / "qwen3_8b_srpo.yaml"], REQUIRED)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        validate_layout(cfg, world_size=6)


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


def test_8b_example_dry_run_on_cpu():
    """The 8B launcher's config, layout (8 ranks) and model (meta device) pass start-up validation."""
    import os
    import subprocess

    root = CONFIGS.parent
    env = {**os.environ, "GPUS_PER_NODE": "8", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{root / '.venv' / 'bin'}:{env['PATH']}" if (root / ".venv").is_dir() else env["PATH"]
    out = subprocess.run(
        ["bash", "examples/run_qwen3_8b_srpo.sh", "--dry-run"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plan: world 8 = tp 4 x pp 1 x dp 2" in out.stdout
    # HF Qwen3-8B: 8,190,735,360; at TP 4 the vocabulary pads to 152,064 (+128 rows, embedding and output)
    assert "Qwen3ForCausalLM 8,191,783,936 parameters (Megatron, vocab padded for tp 4)" in out.stdout
    assert "2 SGLang engine(s) x TP 4, launched colocated on GPUs 0-7" in out.stdout
    # bf16 params 2 + fp32 grads 4 + Adam 12 / dp 2 bytes on 8.191e9 / 4 params; the teacher 2 bytes
    # of weights + 4 / dp 2 of fp32 EMA values; 80 - 40 - 22.9 - 7.6 = 9.5 GiB left
    assert "actor 22.9 GiB (params, fp32 grads, Adam over dp 2), EMA teacher 7.6 GiB" in out.stdout
    assert "mem_fraction=0.5 takes 40.0 of 80 GiB, leaving 9.5 GiB" in out.stdout
    assert "dry run OK" in out.stdout


@pytest.mark.parametrize("key", ["algorithm.kl_coef=0.01", "algorithm.entropy_coef=0.01"])
def test_kl_and_entropy_terms_are_refused_at_start(key):
    # no reference policy and no entropy bonus (the paper trains without them): an unknown key
    with pytest.raises(ValueError, match=key.split("=")[0].split(".")[1]):
        load_config(["configs/tiny_cpu.yaml"], [key])
