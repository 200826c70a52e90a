"""Megatron's sequence parallelism and activation recompute change memory, not numbers: at TP=2 on
gloo, fp32, each setting's SRPO losses and gradient equal those of the plain run (one spawned pair
of processes runs every setting)."""

import pytest
from actor_steps import gradients_per_memory_setting_in_ranks

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed

SETTINGS = {
    "plain": [],
    "sequence_parallel": ["model.sequence_parallel=true"],
    "selective_core_attn": ["model.recompute_granularity=selective"],
    "selective_mlp": ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,mlp]"],
    "full_uniform_2": [
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=2",
    ],
    "full_block_1": [
        "model.recompute_granularity=full",
        "model.recompute_method=block",
        "model.recompute_num_layers=1",
    ],
    "sequence_parallel_full_uniform_1": [
        "model.sequence_parallel=true",
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
    ],
}


@pytest.fixture(scope="module")
def per_setting(tiny_run_inputs, tmp_path_factory):
    overrides = [
        f"model.hf_dir={tiny_run_inputs / 'model'}",
        f"data.train_files=[{tiny_run_inputs / 'train.parquet'}]",
        "model.tp=2",
        "model.dtype=float32",
        "algorithm.variant=srpo_no_dw",
        "algorithm.topk=8",
        "train.ops_chunk_tokens=8",  # several chunks per micro-batch
        "optim.clip_grad=0",  # the gradients as computed (clipping would rescale them in place)
        f"log.output_dir={tmp_path_factory.mktemp('memory_settings')}",
    ]
    return run_distributed(
        gradients_per_memory_setting_in_ranks,
        world_size=2,
        layout=ParallelLayout(tp=2),
        args=(overrides, SETTINGS),
        timeout=600,
    )[0]


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "plain"])
def test_memory_setting_gives_the_plain_losses_and_gradient(per_setting, setting):
    # the SP + full-recompute run is compared with the SP run, the others with the plain one
    reference = per_setting["sequence_parallel" if setting.startswith("sequence_parallel_") else "plain"]
    got = per_setting[setting]
    assert len(got["losses"]) == 2 and all(grpo != 0 and sdpo != 0 for grpo, sdpo in got["losses"])
    for (grpo, sdpo), (ref_grpo, ref_sdpo) in zip(got["losses"], reference["losses"], strict=True):
        assert grpo == pytest.approx(ref_grpo, rel=1e-6) and sdpo == pytest.approx(ref_sdpo, rel=1e-6)
    assert got["grad"].keys() == reference["grad"].keys()
    for name, expected in reference["grad"].items():
        assert expected.abs().max() > 0, name
        assert (got["grad"][name] - expected).abs().max() <= 1e-6 * expected.abs().max(), name
