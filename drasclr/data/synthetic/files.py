"""Atomic, byte-reproducible output files: gzipped NIfTI, JSON and CSV.

Every file is written to a temporary file in its destination folder and moved into place with
``os.replace``, so an interrupted run never leaves a truncated file under a final name. NIfTI
files are gzipped with ISA-L (``isal.igzip``) at level 1 with mtime 0: deterministic bytes, the
size of zlib's level 1, and far less CPU than the zlib gzip of ``nibabel.save``; with the
array handed over in Fortran order, writing a subject is faster than ``nibabel.save``
(``benchmarks/bench_synthetic.py``, figures in ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from drasclr.atomic import atomic_write_bytes


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A ``.nii.gz`` of ``array`` (its dtype kept) with ``affine`` as sform and qform."""
    import nibabel as nib
    from isal import igzip

    # NIfTI stores Fortran order: handing nibabel that layout spares to_bytes() its chunked
    # reordering of a C-ordered array (same bytes).
    image = nib.Nifti1Image(np.asfortranarray(array), affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    atomic_write_bytes(path, igzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """CSV with a header row; missing values are left empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())
