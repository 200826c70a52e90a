"""Trainer weights -> rollout engines: HF-named full tensors in buckets, one transport per file.

buckets.py    bucket planning and SGLang's flat byte layout
broadcast.py  disaggregated: NCCL broadcast from each PP stage's source rank (SGLang protocol)
tensor.py     in-process / colocated: buckets handed to ``engine.update_weights``
verify.py     checksums of what the engine holds against what the trainer sent
loopback.py   a local-process engine endpoint over queues (CPU tests and benchmark)
"""
