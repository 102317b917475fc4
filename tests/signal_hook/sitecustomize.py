"""Run at start-up by every process of a run whose PYTHONPATH holds this folder (the run's
spawned workers too): when processing of the subject named by DRASCLR_TEST_SIGNAL_AT starts,
the process sends DRASCLR_TEST_SIGNAL (e.g. SIGINT) to its whole process group. The tests'
interruptions so land at a fixed point of the work, however loaded the machine is."""
import os

if os.environ.get("DRASCLR_TEST_SIGNAL_AT"):
    import signal
    from pathlib import Path

    from drasclr.data import subject

    _process_subject = subject.process_subject

    def process_subject(source, *args, **kwargs):
        if Path(kwargs["transforms_dir"]).name == os.environ["DRASCLR_TEST_SIGNAL_AT"]:
            os.killpg(os.getpgrp(), getattr(signal, os.environ["DRASCLR_TEST_SIGNAL"]))
        return _process_subject(source, *args, **kwargs)

    subject.process_subject = process_subject
