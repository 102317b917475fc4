"""``drasclr train`` that SIGKILLs itself at a fixed point of its work, for the kill tests.

    python tests/killed_train.py checkpoint|step N -- train --config run.yaml

``checkpoint N``: right after its N-th checkpoint file is complete; ``step N``: when it is
about to train step N + 1 (step N's metrics row written). The kill comes from the run itself,
so it lands at that point however loaded the machine is; its DataLoader workers must die with
it, as with any kill.
"""
from __future__ import annotations

import os
import signal
import sys

from drasclr.cli import main
from drasclr.pretrain import trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_after_checkpoint(count: int) -> None:
    original, saved = trainer.save_checkpoint, []

    def save_checkpoint(state, path):
        result = original(state, path)
        saved.append(path)
        if len(saved) == count:
            die()
        return result

    trainer.save_checkpoint = save_checkpoint


def die_before_step(step: int) -> None:
    original = trainer.Trainer._train_step

    def train_step(self, batch):
        if self.step == step:
            die()
        return original(self, batch)

    trainer.Trainer._train_step = train_step


if __name__ == "__main__":
    moment, count, separator, *command = sys.argv[1:]
    assert separator == "--", "usage: killed_train.py checkpoint|step N -- train ..."
    {"checkpoint": die_after_checkpoint, "step": die_before_step}[moment](int(count))
    sys.exit(main(command))
