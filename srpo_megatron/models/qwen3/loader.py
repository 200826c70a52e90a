"""Load an HF Qwen3 safetensors checkpoint into this rank's Megatron model shard.

Every rank reads only the rows/columns of its own TP shard and PP stage, and of a MoE model only
its own experts (EP), one parameter at a time (host memory: about one tensor, not the model). Before any weight is touched, the checkpoint's
tensor names and shapes are checked against the config: a missing, unexpected or misshapen tensor
is a ValueError naming it, never a partial load.

Load before wrapping the model in DDP / building the optimizer (the optimizer's fp32 main params
are copied from the model when it is created).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from srpo_megatron.models.hf_checkpoint import SafetensorsReader
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.models.qwen3.mapping import LM_HEAD, hf_tensor_shapes, map_params, read_shard

# Tensors HF itself ignores when loading: non-persistent RoPE buffers of old checkpoints.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_hf_tensors(reader: SafetensorsReader, arch: Qwen3Arch) -> None:
    """ValueError unless the checkpoint holds exactly the tensors of ``arch``, with their shapes."""
    expected = hf_tensor_shapes(arch)
    stored = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    if arch.tie_word_embeddings:
        stored.discard(LM_HEAD)  # some tied checkpoints store it anyway; HF ties it to embed_tokens
    missing = [n for n in expected if n not in stored]
    unexpected = sorted(stored - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"HF checkpoint {reader.hf_dir} does not match its config: "
            f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ValueError(
                f"HF tensor {name!r} has shape {list(reader.shape(name))}, the config implies {list(shape)}"
            )


def load_hf_weights(
    model: torch.nn.Module,
    hf_dir: str | Path,
    hf_config: dict[str, Any] | None = None,
    *,
    on_param: Callable[[str], None] | None = None,
) -> int:
    """Copy the HF checkpoint in ``hf_dir`` into ``model`` (this rank's GPTModel stage, unwrapped).

    hf_config: the config dict (default: ``<hf_dir>/config.json``). on_param: called with each
    Megatron parameter name after it is loaded (progress display). Returns the number of
    parameters loaded. Uses Megatron's parallel state for this rank's TP position.
    """
    from megatron.core import parallel_state

    arch = Qwen3Arch.from_hf(hf_config if hf_config is not None else load_hf_config(hf_dir))
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, arch)
    # (rank, size) in the tensor-parallel group of the non-expert and of the expert parameters
    tp_of = {
        False: (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        True: (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        ),
    }
    params = dict(model.named_parameters())
    maps = map_params(model)
    padded_vocab = model.vocab_size  # GPTModel's vocab_size is the padded one
    with torch.no_grad():
        for pm in maps:
            param = params[pm.mcore_name]
            tp_rank, tp = tp_of[pm.expert is not None]
            shard = read_shard(pm, reader.read, arch, tp_rank, tp, padded_vocab)
            if shard.shape != param.shape:
                raise ValueError(
                    f"HF tensor(s) {list(pm.hf_names)} give shape {list(shard.shape)} for Megatron "
                    f"parameter {pm.mcore_name!r} of shape {list(param.shape)} (TP rank {tp_rank} of {tp})"
                )
            param.copy_(shard)
            del shard
            if on_param is not None:
                on_param(pm.mcore_name)
    return len(maps)
