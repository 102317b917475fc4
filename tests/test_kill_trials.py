"""a few of benchmarks/kill_test.py's trials in the suite. Training is
SIGKILLed at fixed points (right after its first checkpoint, before its fourth step: the run
kills itself there, tests/killed_train.py), resumed, and must end bit-identical to an
uninterrupted run: every tensor of every checkpoint, metrics.csv as text.
(Preprocessing's kill-and-resume trial is tests/test_preprocess.py's
test_interrupted_run_resumes_to_the_same_store.)"""
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kill_test

KILLED_TRAIN = Path(__file__).with_name("killed_train.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    store, atlas = kill_test.make_train_inputs(folder)
    kill_test.run_to_end(kill_test.train_command(store, atlas, folder / "reference"))
    return store, atlas, kill_test.run_state(folder / "reference")


@pytest.mark.parametrize("moment", [("checkpoint", 1), ("step", 3)],
                         ids=["first checkpoint", "fourth step"])
def test_killed_training_resumes_bit_identical(reference, tmp_path, moment):
    store, atlas, expected = reference
    out = tmp_path / "run"
    command = kill_test.train_command(store, atlas, out)
    killed = subprocess.run([sys.executable, str(KILLED_TRAIN), *map(str, moment), "--",
                             *command[command.index("train"):]], env=kill_test.ENV,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILLed, not finished nor failed
    kill_test.run_to_end(command)
    assert kill_test.differences(expected, kill_test.run_state(out)) == []
    assert kill_test.temporaries(out) == []
