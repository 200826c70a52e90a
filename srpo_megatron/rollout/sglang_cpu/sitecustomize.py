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
"""

import importlib.abc
import importlib.util
import os
import sys


def _patch(torch) -> None:
    if torch.cuda.is_available():
        return
    get_device_module = torch.get_device_module
    torch.get_device_module = lambda device=None: torch.cpu if device is None else get_device_module(device)


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # once, and not while finding torch's own spec below
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    sys.meta_path.insert(0, _PatchTorchOnImport())
