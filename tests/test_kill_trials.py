"""a few of benchmarks/kill_test.py's trials in the suite. Training is
SIGKILLed at fixed points (while it starts, after its first checkpoints), resumed, and must end
bit-identical to an uninterrupted run: every tensor of every checkpoint, metrics.csv as text.
(Preprocessing's kill-and-resume trial is tests/test_preprocess.py's
test_interrupted_run_resumes_to_the_same_store.)"""
import subprocess
import time

import pytest

from benchmarks import kill_test


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    store, atlas = kill_test.make_train_inputs(folder)
    kill_test.run_to_end(kill_test.train_command(store, atlas, folder / "reference"))
    return store, atlas, kill_test.run_state(folder / "reference")


def kill_when(command, ready, timeout=300):
    """Start ``command``, SIGKILL its main process as soon as ``ready()``; True when killed."""
    process = subprocess.Popen(command, env=kill_test.ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = process.poll() is None
    process.kill()
    process.wait()
    return killed


@pytest.mark.parametrize("moment", ["first checkpoint", "third step"])
def test_killed_training_resumes_bit_identical(reference, tmp_path, moment):
    store, atlas, expected = reference
    out = tmp_path / "run"
    command = kill_test.train_command(store, atlas, out)
    metrics = out / "metrics.csv"

    def ready():
        if moment == "first checkpoint":
            return (out / "checkpoint_last.pt").exists()
        return metrics.exists() and metrics.read_text().count("\n") >= 4  # header + 3 steps

    assert kill_when(command, ready), "the run finished before the kill"
    kill_test.run_to_end(command)
    assert kill_test.differences(expected, kill_test.run_state(out)) == []
    assert kill_test.temporaries(out) == []
