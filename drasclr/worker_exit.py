"""Worker processes that die with the main process of their run.

A pool's workers normally notice a dead parent only when they next talk to it; after a hard
kill (SIGKILL, the out-of-memory killer) of the main process, a worker in the middle of a
subject's registration or a batch read would keep running, holding cores, memory and file
locks, until its task ends. On Linux the kernel can send each worker a signal the moment its
parent goes (``prctl(PR_SET_PDEATHSIG)``); :func:`die_with_parent` asks for SIGKILL. It is the
``initializer`` of the process pools and the ``worker_init_fn`` of DataLoaders. Elsewhere it
does nothing: the pools' own checks still end the workers, later.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; True when it will.

    ``parent_pid``: the pid the parent had when it started this worker. If the parent is
    already gone (it died between starting the worker and this call, so the request would
    never fire) the worker exits at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # orphaned already: re-parented to init or a subreaper
    return True


class DataLoaderWorkerInit:
    """``worker_init_fn`` for a DataLoader: its workers die with the process that made it
    (a picklable object, so spawned workers can receive it)."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
