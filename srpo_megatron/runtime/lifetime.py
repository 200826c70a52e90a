"""Ranks die with their launcher.

torchrun (torch 2.14) starts every rank in a session of its own, so neither a signal to the
launcher's process group nor the launcher's own death (SIGKILL, the OOM killer, a lost Slurm step)
reaches the ranks: they would train on alone and race a rerun for the run directory. A
parent-death signal, armed by each rank at start, has the kernel kill the rank when the process
that started it (torchrun's agent, on every node, under Slurm too) dies.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing). SIGKILL and not
    SIGTERM: nothing is left to report to, and a rank blocked in a collective must not linger."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
