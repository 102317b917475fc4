"""Atomic, byte-reproducible output files: gzipped NIfTI, JSON and CSV.

Every file is written to a temporary file in its destination folder and moved into place with
``os.replace``, so an interrupted run never leaves a truncated file under a final name. NIfTI
files go through ``nibabel.save``, whose gzip writer (nibabel >= 4) is deterministic (no file
name, mtime 0 in the header) and uses compression level 1 by default: the fastest level (CT
noise compresses poorly anyway). It costs the same CPU time as gzipping ``to_bytes()`` ourselves
(``benchmarks/bench_synthetic.py``) without holding the whole file in memory twice.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from drasclr.atomic import atomic_path, atomic_write_bytes


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A ``.nii.gz`` of ``array`` (its dtype kept) with ``affine`` as sform and qform."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    with atomic_path(path, ".nii.gz") as temporary:
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
