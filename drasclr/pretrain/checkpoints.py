"""Training checkpoints: atomic writes, and loading the query encoder for feature extraction.

A checkpoint is a ``torch.save`` dict that ``torch.load(weights_only=True)`` can read:

- ``encoder_q``: the query encoder's state dict (with its projection head) and
  ``encoder_config``: the keyword arguments that rebuild it (``Encoder(**encoder_config)``);
- ``model``: the whole DrasCLR module (both encoders, ``bank.keys``, ``bank.pointers``);
- ``optimizer``, ``scheduler``, ``rng`` (torch CPU/CUDA generator states), ``config``;
- ``position``: ``step`` (optimiser steps done), ``epoch`` and ``batch`` (the next batch of
  that epoch), so a resumed run continues with the batch an uninterrupted run would train next.

``checkpoint_last.pt`` holds everything; ``encoder_epoch_NNNN.pt`` (written at each epoch's
end) holds only ``encoder_q`` and ``encoder_config``, small enough to keep them all.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from drasclr.atomic import atomic_path
from drasclr.file_format import check_header

CHECKPOINT_FORMAT = "drasclr-pretrain"
CHECKPOINT_VERSION = 1
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


#: What every checkpoint holds (``encoder_epoch_NNNN.pt`` too), and what a resumable one adds.
ENCODER_KEYS = ("encoder_q", "encoder_config")
RESUME_KEYS = ENCODER_KEYS + ("model", "optimizer", "scheduler", "rng", "config", "position")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ENCODER_KEYS) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; ValueError naming the file when it is
    not one or lacks any of the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle errors: all mean "not a checkpoint"
        raise ValueError(f"{path}: unreadable checkpoint ({error})") from error
    check_header(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "pretraining checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{path}: pretraining checkpoint without {missing} (found "
                         f"{sorted(map(str, state))})")
    return state


def load_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """The trained query encoder of a checkpoint, as a `drasclr.nn.Encoder` in eval mode.

    Use ``encoder(x, loc)`` for the representation h (Yu et al. 2023, eq. 10); the projection
    head is loaded too but downstream tasks do not use it.
    """
    state = load_checkpoint(path, map_location=device)
    return encoder_from_state(state, source=path).to(device).eval()


def encoder_from_state(state: dict[str, Any], backend: str | None = None,
                       source: str | Path = "checkpoint"):
    """The query encoder held by a loaded checkpoint (``encoder_q`` built from
    ``encoder_config``), with its saved Loc-CondConv backend unless ``backend`` is given.

    Raises:
        ValueError: naming ``source``: a missing key, an ``encoder_config`` with unknown keys
            or bad values, weights of the wrong keys or shapes, or non-finite weights.
    """
    from drasclr.reference_checkpoint import load_checked_state
    from drasclr.nn import Encoder

    missing = [key for key in ENCODER_KEYS if key not in state]
    if missing:
        raise ValueError(f"{source}: pretraining checkpoint without {missing}")
    config = state["encoder_config"]
    if not isinstance(config, dict):
        raise ValueError(f"{source}: encoder_config is a {type(config).__name__}, not a mapping")
    known = set(inspect.signature(Encoder).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{source}: encoder_config has unknown key(s) {unknown}; valid keys: "
                         f"{sorted(known)}")
    config = {**config, **({"backend": backend} if backend is not None else {})}
    try:
        encoder = Encoder(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: encoder_config {config}: {error}") from None
    load_checked_state(source, encoder, state["encoder_q"])
    return encoder
