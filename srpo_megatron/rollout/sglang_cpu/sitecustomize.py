"""Run at the start of every process of a CPU SGLang server (``rollout/sglang_cpu`` is first on
its ``PYTHONPATH``; ``SGLANG_USE_CPU_ENGINE=1`` marks such a server).

sglang 0.5.23's ``Scheduler.release_memory_occupation``
(``sglang/srt/managers/scheduler_components/weight_updater.py``) ends with
``torch.get_device_module().synchronize()``. With no argument torch returns the module of the
build's accelerator, ``torch.cuda`` in PyPI's CUDA build even where no GPU exists, whose
``synchronize`` raises without a driver: the scheduler dies and takes the server with it. Here,
once torch is imported, a call without a device gets ``torch.cpu`` when CUDA is not available;
every call naming a device is torch's own. (Patched when torch is imported, not here: the
server's helper processes that never import torch stay small.)

sglang 0.5.23's routed-experts capture (``--enable-return-routed-experts``) keeps its host buffer
pinned: ``state_capturer/base.py`` allocates it with ``ALLOC_MEMORY_FUNCS["cpu"]``
(``mem_cache/pool_host/common.py``), which registers the memory with ``cudaHostRegister`` through
``torch.cuda.cudart()`` and raises without a driver. Here, when that module is imported without
CUDA, its "cpu" entry allocates plain host memory (pinning only speeds up copies to a GPU).
"""

import importlib.abc
import importlib.util
import os
import sys


def _patch_torch(torch) -> None:
    if torch.cuda.is_available():
        return
    get_device_module = torch.get_device_module
    torch.get_device_module = lambda device=None: torch.cpu if device is None else get_device_module(device)


def _patch_host_alloc(common) -> None:
    import torch

    if torch.cuda.is_available():
        return

    def allocate(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
        return allocator.allocate(dims, dtype=dtype, device=device)

    common.ALLOC_MEMORY_FUNCS["cpu"] = allocate


_PATCHES = {"torch": _patch_torch, "sglang.srt.mem_cache.pool_host.common": _patch_host_alloc}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs the patch of a module of ``_PATCHES`` right after the module's own code."""

    def __init__(self):
        self._finding: set[str] = set()

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES or name in self._finding:
            return None
        self._finding.add(name)  # not while finding the module's own spec below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding.discard(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    sys.meta_path.insert(0, _PatchOnImport())
