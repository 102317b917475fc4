"""the workers of a parallel run die with its main process, SIGKILL
included, and the next run removes the temporary files that killed writers left."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from drasclr.atomic import atomic_path, remove_stale_temporaries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux-only")

POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from drasclr.data.preprocess import _init_worker

def work(_):
    time.sleep(600)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))
    for _ in range(2):
        pool.submit(work, None)
    time.sleep(3)  # the workers have started and run their initialiser
    print(*[p.pid for p in pool._processes.values()], flush=True)
    time.sleep(600)
"""

LOADER = """
import os, time, torch
from drasclr.worker_exit import DataLoaderWorkerInit

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, index):
        print(os.getpid(), flush=True)
        time.sleep(600)

if __name__ == "__main__":
    loader = torch.utils.data.DataLoader(Slow(), batch_size=None, num_workers=2,
                                         worker_init_fn=DataLoaderWorkerInit())
    next(iter(loader))
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, only not yet reaped
        return stat.read().split(")")[-1].split()[0] != "Z"


def kill_parent_and_wait_for(script, tmp_path, read_pids):
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(script))
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        workers = read_pids(parent.stdout)
        assert workers and all(alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "workers outlived the killed parent"
    finally:
        parent.kill()


def test_pool_workers_die_with_a_killed_parent(tmp_path):
    kill_parent_and_wait_for(POOL, tmp_path,
                             lambda out: [int(p) for p in out.readline().split()])


def test_dataloader_workers_die_with_a_killed_parent(tmp_path):
    def two_pids(out):
        return sorted({int(out.readline()) for _ in range(2)})

    kill_parent_and_wait_for(LOADER, tmp_path, two_pids)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with atomic_path(tmp_path / "sub" / "patch.npy", suffix=".npy") as live:
        live.write_bytes(b"being written")
        name = live.name
        host = name.split("~")[1]
        assert name.startswith(".patch.npy~") and f"~{os.getpid()}~" in name
        stale = [tmp_path / f".manifest.csv~{host}~{dead.pid}~abc.tmp",
                 tmp_path / "sub" / f".patch.npy~{host}~{dead.pid}~x_1.npy"]
        kept = [tmp_path / f".manifest.csv~other-host~{dead.pid}~abc.tmp",  # maybe alive there
                tmp_path / "notes~a~1~b.txt",  # not hidden: not one of ours
                tmp_path / "manifest.csv"]
        for path in stale + kept:
            path.write_bytes(b"x")
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted(stale)
        assert live.exists() and all(p.exists() for p in kept)  # a live writer keeps its file
    assert (tmp_path / "sub" / "patch.npy").read_bytes() == b"being written"
