"""Megatron model shards -> the stream of full HF-named tensors (the converter and weight sync).

``export_hf_tensors(model, hf_config)`` runs on EVERY rank of the model-parallel group and walks
this rank's parameters in HF order (embedding, layers ascending, final norm, lm_head). TP-sharded
parameters are all-gathered over the TP group (every TP rank of the stage must iterate to the end
together: the gathers are collectives), then un-fused (QKV per query group -> q/k/v; linear_fc1 ->
gate/up) and stripped of vocabulary padding. Who gets what:

- the tensors of a PP stage come out on that stage's TP rank 0, each exactly once;
- every other rank yields nothing (it still takes part in the gathers), unless
  ``every_tp_rank=True``: then every TP rank yields its own copy (colocated engines read each
  GPU's copy in place);
- PP stages run independently (no cross-stage communication): a consumer that needs the whole
  model on one rank (weight sync to a single engine) broadcasts from the owning stages.
- tied embeddings: ``lm_head.weight`` is not exported (HF ties it to ``embed_tokens``); the last
  stage's copy of the embedding is skipped.

One tensor is materialised at a time (two or three for the fused QKV / gate-up); buckets are the
consumer's choice. Tensors stay on the parameters' device, in the parameters' dtype; replicated
ones (norms) are the parameters themselves, detached: copy them if you keep them across an update.
"""

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.mapping import is_tp_sharded, map_params, merge_shards


def export_hf_tensors(
    model: torch.nn.Module, hf_config: dict[str, Any] | Any, *, every_tp_rank: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for this PP stage on its TP rank 0, or on every TP rank
    (see module docstring).

    model: this rank's bare GPTModel stage (unwrap DDP / Float16Module first).
    """
    from megatron.core import parallel_state

    arch = Qwen3Arch.from_hf(hf_config)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    is_producer = every_tp_rank or parallel_state.get_tensor_model_parallel_rank() == 0
    params = dict(model.named_parameters())
    for pm in map_params(model):
        if pm.tied_copy:
            continue
        local = params[pm.mcore_name].detach()
        if is_tp_sharded(pm) and tp > 1:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
        else:
            shards = [local]
        if is_producer:
            yield from merge_shards(pm, shards, arch)
        del shards
