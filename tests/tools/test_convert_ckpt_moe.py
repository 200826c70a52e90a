"""Checkpoint conversion of a Qwen3-MoE: HF -> Megatron at EP, TP or PP = 2 -> torch_dist -> HF gives
every tensor back bitwise (the router and each expert included), and a checkpoint written at one
layout loads at another (TP=2 -> EP=2) and exports the same tensors."""

import json
from pathlib import Path

import pytest
import torch
from test_convert_ckpt import assert_bitwise_equal, read_hf_tensors, run_tool
from tiny_qwen3 import tiny_qwen3_moe_config

from srpo_megatron.models.qwen3.convert import hf_to_mcore
from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed

VOCAB = 1100


def make_hf_moe_model(hf_dir):
    """Tiny random fp32 Qwen3-MoE: 4 layers (layer 1 dense), 4 experts, untied, normal weights."""
    from transformers import Qwen3MoeForCausalLM

    config = tiny_qwen3_moe_config(
        vocab_size=VOCAB,
        num_hidden_layers=4,
        mlp_only_layers=[1],
        eos_token_id=7,
        dtype="float32",
        architectures=["Qwen3MoeForCausalLM"],
    )
    torch.manual_seed(4)
    model = Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(hf_dir)
    return model


def _to_hf(mcore_dir: str, out_dir: str) -> None:
    from srpo_megatron.models.qwen3.convert import mcore_to_hf

    mcore_to_hf(mcore_dir, out_dir, progress=False)


@pytest.fixture(scope="module")
def hf_moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_moe")
    make_hf_moe_model(path)
    return path


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 2), (1, 2, 1)])
def test_round_trip_is_bitwise(hf_moe_dir, tmp_path, tp, pp, ep):
    hf_to_mcore(hf_moe_dir, tmp_path / "mcore", tp=tp, pp=pp, ep=ep, progress=False)
    meta = json.loads((tmp_path / "mcore" / "srpo_meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["ep"]) == (tp, pp, ep)
    run_distributed(
        _to_hf, world_size=1, megatron=False, args=(str(tmp_path / "mcore"), str(tmp_path / "back"))
    )
    source = read_hf_tensors(hf_moe_dir)
    assert (
        "model.layers.3.mlp.experts.3.down_proj.weight" in source
        and "model.layers.1.mlp.up_proj.weight" in source
    )
    assert_bitwise_equal(source, read_hf_tensors(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [1]


def _load_and_export(mcore_dir: str) -> dict[str, torch.Tensor]:
    """This rank's share of the exported tensors of a checkpoint loaded at this world's layout."""
    from srpo_megatron.models.qwen3.checkpoint import load_divisor, load_model, params_dtype_of, read_meta
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    meta = read_meta(mcore_dir)
    model = build_qwen3_model(
        meta["hf_config"],
        params_dtype=params_dtype_of(meta),
        make_vocab_size_divisible_by=load_divisor(meta, 1),
        init_weights=False,
    )
    load_model(model, mcore_dir)
    return {name: tensor.clone() for name, tensor in export_hf_tensors(model, meta["hf_config"])}


def test_tp2_checkpoint_loads_at_ep2_and_cli_takes_ep(hf_moe_dir, tmp_path):
    out = run_tool(
        "hf_to_mcore.py",
        *("--hf-dir", str(hf_moe_dir), "--out-dir", str(tmp_path / "mcore"), "--tp", "2", "--ep", "1"),
    )
    assert "TP=2, PP=1, EP=1" in out
    per_rank = run_distributed(
        _load_and_export, world_size=2, layout=ParallelLayout(ep=2), args=(str(tmp_path / "mcore"),)
    )
    assert per_rank[1] == {}  # EP rank 1 sends its experts to EP rank 0, which yields everything
    assert_bitwise_equal(read_hf_tensors(hf_moe_dir), per_rank[0])


def test_ep_that_does_not_divide_the_experts_is_named(hf_moe_dir, tmp_path):
    with pytest.raises(ValueError, match="EP size 3 does not divide num_experts=4"):
        hf_to_mcore(hf_moe_dir, tmp_path / "mcore", ep=3, progress=False)
    assert not Path(tmp_path / "mcore").exists()
