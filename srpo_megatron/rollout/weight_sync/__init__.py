"""Trainer weights -> rollout engines: the actor's Megatron shards, exported as HF-named full
tensors (``models/qwen3/exporter.py``) in buckets, one transport per file, each a ``WeightSync``:

in_process.py  the HF engine in global rank 0's process; later pipeline stages send their buckets
               to rank 0 point to point (``InProcessWeightSync``)
broadcast.py   disaggregated SGLang: each pipeline stage's source rank broadcasts its own layers in
               SGLang's weight-update group of that stage (NCCL; ``BroadcastWeightSync``), and the
               engine side of that protocol in plain torch (``BroadcastWeightReceiver``)
cuda_ipc.py    colocated SGLang: every rank hands CUDA IPC handles of its own copy to the engine
               rank on its GPU (``CudaIpcWeightSync``)
buckets.py     bucket planning and SGLang's flat byte layout
verify.py      checksums of what the engine holds against what the trainer sent

The trainer picks the transport once, where it starts the engines (``trainer/engines.py``), and
then calls every one the same way, on every rank.
"""

from typing import Protocol

import torch


class WeightSync(Protocol):
    def sync(self, model: torch.nn.Module, hf_config: dict) -> dict[str, float]:
        """Every rank, after each optimizer step (and once at the start): this rank's model stage
        (the bare GPTModel; the exporter's TP gathers are collectives) -> the engines. Returns the
        metrics to log (``sync/bytes`` on global rank 0)."""
        ...

    def close(self) -> None:
        """Every rank, at the end of the run, before the engines are shut down."""
        ...
