"""HF directory <-> Megatron torch_dist checkpoint, on CPU without torchrun (tools/convert_ckpt/).

- ``hf_to_mcore``: validates the HF directory in this process, then spawns ``tp * pp * ep`` gloo
  ranks (``runtime.launch.run_distributed``; EP splits data parallelism, so ``dp = ep``); each
  builds its model stage, loads only its slices of the HF tensors (its experts only) and takes
  part in one ``dist_checkpointing.save``, which writes each expert once and each replicated
  tensor from data-parallel rank 0. ``srpo_meta.json`` is written last, so a checkpoint without it
  is an interrupted one. Memory: each rank holds its model shard plus one tensor.
- ``mcore_to_hf``: runs in this process as a world of one (TP=1, PP=1, EP=1): builds the whole
  model, loads any-TP/PP/EP ``model/`` through dist_checkpointing (which reshards, experts
  included) and streams the exporter into size-bounded safetensors shards. Memory: the model in
  its stored dtype plus one shard (Qwen3-8B in bf16: about 16 GB + ``max_shard_bytes``).

Callers that must not see a GPU hide it before torch starts (the CLIs set CUDA_VISIBLE_DEVICES="").
"""

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from srpo_megatron.models.hf_checkpoint import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_tokenizer,
    generation_config_from,
    write_json,
)
from srpo_megatron.models.qwen3.checkpoint import (
    load_divisor,
    load_model,
    params_dtype_of,
    read_meta,
    save_model,
    write_meta,
)
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.models.qwen3.exporter import export_hf_tensors
from srpo_megatron.models.qwen3.loader import check_hf_tensors, load_hf_weights
from srpo_megatron.models.qwen3.mapping import EMBED, hf_tensor_shapes
from srpo_megatron.models.qwen3.provider import build_qwen3_model
from srpo_megatron.models.vocab import DEFAULT_VOCAB_DIVISOR, padded_vocab_size
from srpo_megatron.runtime.distributed import ParallelLayout, init_distributed
from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.runtime.progress import progress_bar


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    params_dtype: torch.dtype | None = None,
    progress: bool = True,
    timeout: float = 24 * 3600,
) -> list[Path]:
    """Write ``out_dir/{srpo_meta.json, model/}`` from the HF directory, sharded ``tp`` x ``pp``
    (x ``ep``: the experts of a MoE model).

    params_dtype: default the dtype the HF tensors are stored in (so the round trip is bitwise).
    Returns the files written.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = load_hf_config(hf_dir)
    arch = Qwen3Arch.from_hf(hf_config)
    arch.check_layout(tp, pp, ep)
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, arch)  # fail here, with a clean message, rather than in tp*pp children
    params_dtype = params_dtype or reader.dtype(EMBED)
    del reader
    if (out_dir / "model").exists() and any((out_dir / "model").iterdir()):
        raise ValueError(f"{out_dir / 'model'} exists and is not empty; refusing to mix checkpoints")

    run_distributed(
        _hf_to_mcore_rank,
        world_size=tp * pp * ep,
        layout=ParallelLayout(tp=tp, pp=pp, ep=ep),
        args=(str(hf_dir), str(out_dir), hf_config, params_dtype, make_vocab_size_divisible_by, progress),
        timeout=timeout,
    )
    gen_path = hf_dir / "generation_config.json"
    write_meta(
        out_dir,
        hf_config=hf_config,
        tp=tp,
        pp=pp,
        ep=ep,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        padded_vocab_size=padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        params_dtype=params_dtype,
        source=f"hf:{hf_dir.resolve()}",
        generation_config=json.loads(gen_path.read_text()) if gen_path.is_file() else None,
    )
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def _hf_to_mcore_rank(
    hf_dir: str,
    out_dir: str,
    hf_config: dict[str, Any],
    params_dtype: torch.dtype,
    divisor: int,
    progress: bool,
) -> int:
    """One rank of ``hf_to_mcore``: build this stage, load its HF slices, save (collective)."""
    model = build_qwen3_model(
        hf_config, params_dtype=params_dtype, make_vocab_size_divisible_by=divisor, init_weights=False
    )
    num_params = len(list(model.parameters()))
    with progress_bar(progress and dist.get_rank() == 0) as bar:
        task = bar.add_task(f"rank 0 of {dist.get_world_size()}: loading HF slices", total=num_params)
        loaded = load_hf_weights(model, hf_dir, hf_config, on_param=lambda _: bar.advance(task))
        save_task = bar.add_task("all ranks: writing torch_dist", total=None)
        save_model(model, out_dir)
        bar.update(save_task, total=1, completed=1)
    return loaded


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
) -> list[Path]:
    """Write an HF directory (config, sharded safetensors + index, generation config, tokenizer).

    Runs in this process as a world of one at TP=1, PP=1 (starts it if needed). Returns the
    files written.
    """
    meta = read_meta(mcore_dir)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors*")):
        raise ValueError(f"{out_dir} already holds safetensors files; refusing to mix checkpoints")
    hf_config = meta["hf_config"]
    arch = Qwen3Arch.from_hf(hf_config)
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ValueError(f"mcore_to_hf runs as a world of one process, not {dist.get_world_size()}")
    init_distributed(ParallelLayout())
    dtype = params_dtype_of(meta)
    model = build_qwen3_model(
        hf_config, params_dtype=dtype, make_vocab_size_divisible_by=load_divisor(meta, 1), init_weights=False
    )
    load_model(model, mcore_dir)

    expected = hf_tensor_shapes(arch)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    with progress_bar(progress) as bar:
        task = bar.add_task("exporting HF tensors", total=len(expected))
        for name, tensor in export_hf_tensors(model, hf_config):
            writer.add(name, tensor)
            bar.advance(task)
    written = writer.close()
    exported = set(json.loads(written[-1].read_text())["weight_map"])
    assert exported == expected.keys(), f"exporter gave {sorted(exported ^ expected.keys())} wrongly"

    config = dict(hf_config)
    config["architectures"] = [arch.hf_architecture]
    dtype_name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = dtype_name
    written.append(write_json(out_dir / "config.json", config))
    generation = meta.get("generation_config") or generation_config_from(config)
    written.append(write_json(out_dir / "generation_config.json", generation))
    if tokenizer_dir is not None:
        written += copy_tokenizer(tokenizer_dir, out_dir)
    return written
