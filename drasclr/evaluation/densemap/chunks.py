"""Resumable chunk results of a map job, each written atomically in a work folder."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor, nn

from drasclr.atomic import atomic_write_bytes

WORK_FORMAT = "drasclr-densemap-work"


class ChunkCache:
    """Chunk results of one map job in a work folder, each written atomically.

    The folder holds ``job.json`` with a fingerprint of everything the results depend on
    (scan, lung voxels, coordinates, encoder and head weights, mode, step); a folder left by
    another job is cleared rather than trusted.
    """

    def __init__(self, folder: Optional[str | os.PathLike], fingerprint: str) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            return
        job = self.folder / "job.json"
        if job.is_file():
            try:
                same = json.loads(job.read_text()).get("fingerprint") == fingerprint
            except (ValueError, OSError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not job.is_file():
            atomic_write_bytes(job, json.dumps({"format": WORK_FORMAT, "version": 1,
                                                "fingerprint": fingerprint}).encode())

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"chunk_{index:06d}.npy"

    def get(self, index: int, size: int) -> Optional[np.ndarray]:
        if self.folder is None or not self._path(index).is_file():
            return None
        try:
            values = np.load(self._path(index), allow_pickle=False)
        except (ValueError, OSError):
            return None
        return values if values.shape == (size,) else None

    def put(self, index: int, values: np.ndarray) -> None:
        if self.folder is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(values, dtype=np.float32))
            atomic_write_bytes(self._path(index), buffer.getvalue())

    def remove(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            shutil.rmtree(self.folder)


def fingerprint(*parts: Any) -> str:
    """SHA-256 of arrays, tensors, modules (their state) and JSON-able values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for name, value in part.state_dict().items():
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            digest.update(str((part.dtype, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


