"""Stand-in for the ``sgl_kernel`` package inside a CPU SGLang server (``rollout/sglang_cpu``).

sglang 0.5.23's ``sglang/kernels/ops/kvcache/cache_move.py`` runs
``from sgl_kernel import copy_all_layer_kv_cache_cpu`` at import time when the server runs on a
CPU (``SGLANG_USE_CPU_ENGINE=1``), and PyPI's ``sgl_kernel`` is a CUDA build that raises
ImportError without libcuda. This module is found first on the server's ``PYTHONPATH``: any name
imported from it is a function that raises if called. It registers no ``torch.ops.sgl_kernel``
kernels, so ``sglang.srt.utils.common.cpu_has_amx_support()`` is False and the layers run their
``forward_native`` (plain torch) paths; nothing calls these functions on that path.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            f"sgl_kernel.{name} was called in a CPU SGLang server: srpo_megatron's sgl_kernel stand-in "
            "has no kernels (srpo_megatron/rollout/sglang_cpu)"
        )

    unavailable.__name__ = name
    return unavailable
