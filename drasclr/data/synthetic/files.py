"""Atomic, byte-reproducible output files: gzipped NIfTI, JSON and CSV.

Every file is written to a temporary file in its destination folder and moved into place with
``os.replace``, so an interrupted run never leaves a truncated file under a final name. NIfTI
files are gzipped here rather than by nibabel so that the gzip header's timestamp is fixed
(mtime 0) and the compression level is low (fast; CT noise compresses poorly anyway).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

GZIP_LEVEL = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A ``.nii.gz`` of ``array`` (its dtype kept) with ``affine`` as sform and qform."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0))


def write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """CSV with a header row; missing values are left empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())
