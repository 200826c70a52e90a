"""Rollout engines (HF on CPU, SGLang on GPU) and the weight sync that feeds them.

engine.py         SamplingParams, RolloutBatch, the RolloutEngine protocol
hf_engine.py      HFEngine: CPU default and one-GPU debug engine
sglang_engine.py  SGLangEngine: one SGLang replica, a server driven over HTTP
sglang_server.py  launching ``sglang.launch_server`` processes, waiting for /health, stopping them
sglang_fleet.py   SGLangFleet: the run's replicas from one rank (generate, load weights, memory)
metrics.py        train-vs-rollout log-prob gap on the sampled tokens
weight_sync/      Megatron shards -> HF-named buckets -> engines (see its docstring)

How the trainer drives them: ``trainer/engines.py`` (``make_engine``, ``sync_weights``) and
``trainer/rollouts.py`` (``generate_rollouts``). Global rank 0 holds the engine(s); the weights
reach them
  HF engine:              rank 0's stream (later pipeline stages send theirs to rank 0) in process;
  SGLang disaggregated:   that stream broadcast by rank 0 in the engines' weight-update group
                          (``BroadcastWeightSender``, flattened buckets);
  SGLang colocated:       every rank's own full copy, as CUDA IPC handles gathered on rank 0 and
                          handed to the engine rank on the same GPU.
"""
