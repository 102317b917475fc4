"""Checkpoints of a landmark-sharded run: each process writes its own bank shard, and a resumed
run on any number of processes reads back the queues of the landmarks it now owns.

Layout of ``out_dir``::

    checkpoint_last.json           {"format", "version", "directory": "checkpoints/step_00000040_epoch_0002"}
    checkpoints/step_00000040_epoch_0002/
        trainer.pt                 `drasclr.pretrain.checkpoints` format without the bank:
                                   encoders, optimizer, scheduler, rng, position, config
        bank/                      torch.distributed.checkpoint (DCP) files: one
                                   ``__<rank>_0.distcp`` per process and ``.metadata``

The bank is saved with one DCP entry per landmark (``bank.keys.<l>`` (K, D) and
``bank.pointers.<l>``), written by the process that owns it; no process ever gathers the
whole bank. Loading asks DCP for the entries of the landmarks this process owns *now*, so a
checkpoint written by 2 processes loads on 1, 3 or 4 (each process reads only its queues).

A save is atomic as a set: everything goes into a fresh directory, and only when every
process has finished writing (DCP's save ends with a collective, and ``.metadata`` is written
last) does rank 0 switch ``checkpoint_last.json`` to it with an atomic rename
(`drasclr.atomic`) and remove older directories. A save interrupted at any point leaves the
pointer on the previous complete checkpoint. Several nodes need ``out_dir`` on a file system
they all see (DCP reads other processes' files when the process count changes).

``trainer.pt`` is an ordinary checkpoint file: `drasclr.load_encoder` reads the
encoder from it on a single process, without the bank or a process group.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drasclr.atomic import atomic_write_bytes
from drasclr.pretrain.checkpoints import load_checkpoint, save_checkpoint
from drasclr.pretrain.memory_bank import LandmarkMemoryBank

POINTER = "checkpoint_last.json"
POINTER_FORMAT = "drasclr-sharded-pretrain"
POINTER_VERSION = 1
TRAINER_STATE = "trainer.pt"


def bank_entries(bank: LandmarkMemoryBank) -> dict[str, torch.Tensor]:
    """The bank as DCP entries, one per held landmark; views, so a load fills the bank."""
    entries = {}
    for row, landmark in enumerate(bank.landmarks.tolist()):
        entries[f"bank.keys.{landmark}"] = bank.keys[row]
        entries[f"bank.pointers.{landmark}"] = bank.pointers[row : row + 1]
    return entries


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when it runs without a process group; a one-process run means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_sharded(out_dir: str | Path, name: str, bank: LandmarkMemoryBank, trainer_state: dict[str, Any],
                 rank: int) -> Path:
    """Collective: every process calls it with its bank shard; rank 0's ``trainer_state`` is
    written. ``name``: the new directory under ``checkpoints/``, distinct for every position
    of a run (two saves at one step, e.g. ``checkpoint_every`` and the epoch's end, must not
    share it: the second would delete the checkpoint the pointer names). Returns the new
    checkpoint's ``trainer.pt``."""
    out_dir = Path(out_dir)
    directory = out_dir / "checkpoints" / name
    if directory == last_checkpoint(out_dir):
        raise ValueError(f"{directory}: is the last complete checkpoint; save under a new name")
    if rank == 0 and directory.exists():  # left by a save that was interrupted
        shutil.rmtree(directory)
    _barrier()
    import torch.distributed.checkpoint as dcp  # here: importing it costs seconds

    with _single_process_is_intended():
        dcp.save(bank_entries(bank), checkpoint_id=directory / "bank")
    if rank == 0:
        save_checkpoint(trainer_state, directory / TRAINER_STATE)
        pointer = {"format": POINTER_FORMAT, "version": POINTER_VERSION,
                   "directory": str(directory.relative_to(out_dir))}
        atomic_write_bytes(out_dir / POINTER, json.dumps(pointer).encode())
        for old in (out_dir / "checkpoints").iterdir():
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()  # nobody goes on (or is killed) before the pointer is switched
    return directory / TRAINER_STATE


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory ``checkpoint_last.json`` names, or None when there is no pointer."""
    out_dir = Path(out_dir)
    path = out_dir / POINTER
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a checkpoint pointer ({error})") from None
    if pointer.get("format") != POINTER_FORMAT or pointer.get("version") != POINTER_VERSION:
        raise ValueError(f"{path}: not a {POINTER_FORMAT} v{POINTER_VERSION} pointer")
    directory = out_dir / pointer["directory"]
    if not (directory / TRAINER_STATE).is_file() or not (directory / "bank" / ".metadata").is_file():
        raise ValueError(f"{path}: names {directory}, which is incomplete or missing")
    return directory


def load_sharded(directory: Path, bank: LandmarkMemoryBank, map_location="cpu") -> dict[str, Any]:
    """Fill ``bank`` with its landmarks' queues from ``directory``; return the trainer state."""
    import torch.distributed.checkpoint as dcp  # here: importing it costs seconds

    with _single_process_is_intended():
        dcp.load(bank_entries(bank), checkpoint_id=directory / "bank")  # in place, through the views
    return load_checkpoint(directory / TRAINER_STATE, map_location=map_location)
