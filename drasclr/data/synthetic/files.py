"""Atomic, byte-reproducible output files: gzipped NIfTI, JSON and CSV.

Every file is written to a temporary file in its destination folder and moved into place with
``os.replace``, so an interrupted run never leaves a truncated file under a final name. NIfTI
files go through ``nibabel.save``, whose gzip writer (nibabel >= 4) is deterministic (no file
name, mtime 0 in the header) and uses compression level 1 by default: the fastest level (CT
noise compresses poorly anyway). It costs the same CPU time as gzipping ``to_bytes()`` ourselves
(``benchmarks/bench_synthetic.py``) without holding the whole file in memory twice.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, for writers that read it); moved on success."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; data files are shared read-only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_path(path, ".tmp") as temporary:
        temporary.write_bytes(data)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A ``.nii.gz`` of ``array`` (its dtype kept) with ``affine`` as sform and qform."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    with _atomic_path(path, ".nii.gz") as temporary:
        nib.save(image, temporary)


def write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """CSV with a header row; missing values are left empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())
