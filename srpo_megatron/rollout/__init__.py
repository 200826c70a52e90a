"""Rollout engines (HF on CPU, SGLang on GPU) and the weight sync that feeds them.

engine.py         SamplingParams, RolloutBatch, the RolloutEngine protocol
hf_engine.py      HFEngine: CPU default and one-GPU debug engine
sglang_engine.py  SGLangEngine: ``sglang.Engine`` in process or a launched server
metrics.py        train-vs-rollout log-prob gap on the sampled tokens
weight_sync/      Megatron shards -> HF-named buckets -> engines (see its docstring)

One step, as the trainer drives it (``export = export_hf_tensors(model, hf_config)``):

  HF engine / colocated SGLang (the engine's owner rank holds the handle)
      exports, _, _ = megatron_sync_role()
      if exports: sync_weights_in_process(export, [engine]) on the owner, drain elsewhere
  disaggregated SGLang (engines on their own GPUs), once at start on each stage's source rank:
      sender = BroadcastWeightSender(engines, GroupAddress(addr, port, "weights").for_stage(pp_rank))
      sender.connect()
    then every step, on every rank of data-parallel rank 0's model-parallel group:
      send_or_drain(export, sender if sends else None); dist.barrier()
"""
