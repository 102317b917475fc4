"""the workers of a parallel run die with its main process, SIGKILL
included, and the next run removes the temporary files that killed writers left."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import wait_for_exit

from drasclr.atomic import atomic_path, remove_stale_temporaries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux-only")

# Each worker reports its pid, once its initialiser has run, in one os.write of a whole line:
# writes to a pipe of up to PIPE_BUF bytes are atomic, so the two workers' lines never
# interleave. A worker's task blocks for good, so the other task goes to the other worker.
POOL = """
import multiprocessing, os, threading
from concurrent.futures import ProcessPoolExecutor
from drasclr.data.preprocess import _init_worker

def work(_):
    os.write(1, f"{os.getpid()}\\n".encode())
    threading.Event().wait()

if __name__ == "__main__":
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))
    for _ in range(2):
        pool.submit(work, None)
    threading.Event().wait()
"""

LOADER = """
import os, threading, torch
from drasclr.worker_exit import DataLoaderWorkerInit

class Blocking(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, index):
        os.write(1, f"{os.getpid()}\\n".encode())
        threading.Event().wait()

if __name__ == "__main__":
    loader = torch.utils.data.DataLoader(Blocking(), batch_size=None, num_workers=2,
                                         worker_init_fn=DataLoaderWorkerInit())
    next(iter(loader))
"""


def kill_parent_and_wait_for_its_workers(script, tmp_path):
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(script))
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(parent.stdout.readline()) for _ in range(2)]  # blocks until both report
        assert len(set(workers)) == 2 and parent.pid not in workers
        assert wait_for_exit(workers, timeout=0) == sorted(workers)  # all running
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert wait_for_exit(workers, timeout=30) == [], "workers outlived the killed parent"
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("script", [POOL, LOADER], ids=["process pool", "data loader"])
def test_workers_die_with_a_killed_parent(tmp_path, script):
    kill_parent_and_wait_for_its_workers(script, tmp_path)


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
