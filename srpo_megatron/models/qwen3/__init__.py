"""Qwen3 and Qwen3-MoE on Megatron-core: config -> GPTModel, HF weights in, HF-named tensors out,
checkpoints.

    config.py      HF config.json -> Qwen3Arch (validated; dense or MoE) -> TransformerConfig
    provider.py    build_qwen3_model: this rank's GPTModel stage (TE spec on GPU, local on CPU;
                   Megatron's MoE layers in the sparse layers, experts split over EP)
    mapping.py     HF <-> Megatron names, QKV interleaving, gate/up fusion, TP slicing, experts
    loader.py      load_hf_weights: HF safetensors -> this rank's shard, slice by slice
    exporter.py    export_hf_tensors: shards -> (HF name, full tensor), for conversion and weight sync
                   (experts one at a time from their EP rank)
    checkpoint.py  the Megatron checkpoint layout (srpo_meta.json + model/ torch_dist), save/load
    convert.py     hf_to_mcore / mcore_to_hf (their command line: srpo-convert-ckpt)
    tiny.py        a tiny random HF Qwen3 or Qwen3-MoE (the CPU run's starting point before its
                   warm-up, tests)

Modules import megatron lazily, inside functions: importing this package does not start it.
"""
