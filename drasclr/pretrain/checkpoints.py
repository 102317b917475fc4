"""Training checkpoints: atomic writes, and reading them back to resume a run.

A checkpoint is a ``torch.save`` dict that ``torch.load(weights_only=True)`` can read:

- ``encoder_q``: the query encoder's state dict (with its projection head) and
  ``encoder_config``: the keyword arguments that rebuild it (``Encoder(**encoder_config)``);
- ``model``: the whole DrasCLR module (both encoders, ``bank.keys``, ``bank.pointers``);
- ``optimizer``, ``scheduler``, ``rng`` (torch CPU/CUDA generator states), ``config``;
- ``position``: ``step`` (optimiser steps done), ``epoch`` and ``batch`` (the next batch of
  that epoch), so a resumed run continues with the batch an uninterrupted run would train next.

``checkpoint_last.pt`` holds everything; ``encoder_epoch_NNNN.pt`` (written at each epoch's
end) holds only ``encoder_q`` and ``encoder_config``, small enough to keep them all.
`drasclr.load_encoder` reads the encoder of either (`drasclr.checkpoint_formats`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from drasclr.atomic import atomic_path
from drasclr.checkpoint_formats import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    ENCODER_KEYS,
    CheckpointError,
    check_drasclr_header,
    read_torch_file,
)

LAST = "checkpoint_last.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then a rename.

    Streams to disk (the bank can be a gigabyte), so an interrupted write leaves the previous
    checkpoint untouched.
    """
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, file)
        file.flush()
        os.fsync(file.fileno())
    return path


#: What a resumable checkpoint holds.
RESUME_KEYS = ENCODER_KEYS + ("model", "optimizer", "scheduler", "rng", "config", "position")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ENCODER_KEYS) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError (a ValueError) naming
    the file when it is missing, not one, or lacks any of the ``required`` keys."""
    state = read_torch_file(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"a {type(state).__name__}, not a drasclr checkpoint")
    check_drasclr_header(path, state)
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(path, f"pretraining checkpoint without {missing} (found "
                                    f"{sorted(map(str, state))})")
    return state
