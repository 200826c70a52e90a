"""Rollout engines (HF on CPU, SGLang on GPU) and the weight sync that feeds them.

engine.py         SamplingParams, RolloutBatch, the RolloutEngine protocol
hf_engine.py      HFEngine: CPU default and one-GPU debug engine
sglang_engine.py  SGLangEngine: one SGLang replica, a server driven over HTTP
sglang_server.py  launching ``sglang.launch_server`` processes, waiting for /health, stopping them
sglang_fleet.py   SGLangFleet: the run's replicas from rank 0 (generate, weight-update sessions, memory)
metrics.py        train-vs-rollout log-prob gap on the sampled tokens
weight_sync/      Megatron shards -> HF-named buckets -> engines (see its docstring)

How the trainer drives them: ``trainer/engines.py`` (``start_engine``: the engine on global rank 0
and, on every rank, the ``WeightSync`` that feeds it) and ``trainer/rollouts.py``
(``generate_rollouts``). The weights reach the engines
  HF engine:              rank 0's stream (later pipeline stages send theirs to rank 0), in process;
  SGLang disaggregated:   each pipeline stage's source rank broadcasts its own layers in a
                          weight-update group of its own (``BroadcastWeightSync``, flattened buckets);
  SGLang colocated:       every rank's own full copy, as CUDA IPC handles gathered on rank 0 and
                          handed to the engine rank on the same GPU (``CudaIpcWeightSync``).
"""
