"""Whole dense maps: the lung voxels of a scan (every S-th one, then trilinear interpolation),
written on the scan's own grid (Yu et al. 2023, Section 4.3.1, Fig. 3).

``step=S`` evaluates the voxels of the grid ``S * k`` (global voxel indices, so the values
there are the step-1 values) around the lung and fills every lung voxel by trilinear
interpolation.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from drasclr.atomic import atomic_path
from drasclr.device import resolve_device
from drasclr.evaluation.densemap.scan import (
    PreparedScan, prepare_scan, store_atlas_and_transform, subject_of_image)
from drasclr.evaluation.densemap.window import exact_probabilities
from drasclr.ranges import AT_LEAST_ONE, check_number


def grid_points_for(targets: np.ndarray, step: int) -> np.ndarray:
    """(M, 3) voxels of the grid ``step * k`` that trilinear interpolation needs to fill the
    ``targets`` mask: grid point g is needed when a target voxel lies within ``step - 1``
    voxels of it on every axis (a voxel on a grid plane needs only that plane)."""
    padded = np.pad(np.asarray(targets, dtype=np.uint8), [(0, step)] * 3)
    needed = ndimage.maximum_filter(padded, size=2 * step - 1, mode="constant")
    return np.argwhere(needed[::step, ::step, ::step]) * step


def interpolate_grid(values: np.ndarray, points: np.ndarray, step: int,
                     targets: np.ndarray) -> np.ndarray:
    """Trilinear interpolation from values at grid ``points`` (multiples of ``step``) to the
    voxels of ``targets``; exact (the value itself) on the grid points."""
    index = points // step
    grid = np.zeros(index.max(axis=0) + 2, dtype=np.float64)
    grid[index[:, 0], index[:, 1], index[:, 2]] = values
    where = np.argwhere(targets)
    filled = ndimage.map_coordinates(grid, (where / step).T, order=1, mode="nearest",
                                     prefilter=False)
    out = np.zeros(targets.shape, dtype=np.float32)
    out[targets] = filled  # argwhere and boolean indexing share C order
    return out


def probability_map(
    encoder: nn.Module,
    head: nn.Module,
    scan: PreparedScan,
    *,
    step: int = 1,
    region: Optional[np.ndarray] = None,
    batch: int = 16,
    device: str | torch.device = "auto",
    amp: bool = True,
    chunk_voxels: int = 4096,
    work_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> np.ndarray:
    """The probability map on the 1 mm grid of ``scan``: values at its lung voxels (within
    ``region`` when given, a bool mask of the same grid), 0 elsewhere.

    ``step=S`` evaluates the grid ``S * k`` and interpolates; the result equals the step-1
    map on the grid voxels.
    """
    check_step(step)
    targets = scan.lung if region is None else scan.lung & np.asarray(region, dtype=bool)
    if not targets.any():
        raise ValueError(f"{scan.original.source}: no lung voxels to map")
    voxels = np.argwhere(targets) if step == 1 else grid_points_for(targets, step)
    values = exact_probabilities(encoder, head, scan, voxels, batch=batch, device=device, amp=amp,
                                 chunk_voxels=chunk_voxels, work_dir=work_dir, progress=progress)
    if step == 1:
        out = np.zeros(targets.shape, dtype=np.float32)
        out[targets] = values
        return out
    return interpolate_grid(values, voxels, step, targets)


def check_step(step: int) -> int:
    check_number("step", step, AT_LEAST_ONE)
    return int(step)


def to_original_grid(map_iso: np.ndarray, iso_affine: np.ndarray, shape: Sequence[int],
                     affine: np.ndarray) -> np.ndarray:
    """Resample a map from the 1 mm grid to the scan's own grid (trilinear), so it overlays
    the input scan voxel for voxel."""
    matrix = np.linalg.inv(iso_affine) @ affine  # original index -> 1 mm index
    if np.allclose(matrix, np.eye(4), atol=1e-6) and tuple(shape) == map_iso.shape:
        return map_iso.astype(np.float32, copy=False)
    return ndimage.affine_transform(map_iso.astype(np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=tuple(shape), order=1, mode="constant",
                                    cval=0.0).astype(np.float32)


def write_map(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
              percent: bool = False) -> Path:
    """Write a probability map as NIfTI, atomically: float32 in [0, 1], or uint8 percent."""
    import nibabel as nib

    path = Path(path)
    if percent:
        data = np.rint(np.clip(array, 0, 1) * 100).astype(np.uint8)
    else:
        data = np.asarray(array, dtype=np.float32)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    if not percent:
        image.header["cal_min"], image.header["cal_max"] = 0.0, 1.0
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as temporary:
        nib.save(image, str(temporary))
    return path


@dataclass
class DenseMapResult:
    """What :func:`densemap` did: the map file, its subject, step, timings."""

    path: Path
    subject_id: str
    label: str
    step: int
    voxels: int
    seconds: float
    map_iso: np.ndarray = field(repr=False)
    scan: PreparedScan = field(repr=False)
    mapped: np.ndarray = field(repr=False)  # bool, the 1 mm voxels that have a value
    #: Subjects whose boxes trained the head (its file's record); None: not recorded.
    training_subjects: Optional[tuple[str, ...]] = None
    head_path: Optional[Path] = None

    def on_scan_grid(self, volume: np.ndarray) -> np.ndarray:
        """A volume of the 1 mm grid (the map, ``mapped``) on the scan's own grid."""
        original = self.scan.original
        return to_original_grid(np.asarray(volume, dtype=np.float32), self.scan.iso.affine,
                                original.array.shape, original.affine)


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work folder of a map job: hidden, beside the output."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def densemap(
    image: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    head_path: str | os.PathLike,
    checkpoint: Optional[str | os.PathLike] = None,
    subject_id: Optional[str] = None,
    *,
    step: int = 1,
    batch: int = 16,
    device: str | torch.device = "auto",
    amp: bool = True,
    lung_mask: Optional[str | os.PathLike] = None,
    region: Optional[np.ndarray] = None,
    percent: bool = False,
    chunk_voxels: int = 4096,
    progress: bool = True,
    encoder: Optional[nn.Module] = None,
) -> DenseMapResult:
    """The whole job of ``drasclr densemap``: map one scan and write it on the scan's grid.

    The head and encoder come from ``head_path`` (and ``checkpoint`` for a linear probe,
    :func:`drasclr.evaluation.head.head_and_encoder`); ``encoder`` overrides the encoder
    (tests). Chunks are kept in :func:`work_dir_for` ``(out)`` until the map is written.
    """
    from drasclr.evaluation.head import check_head_matches, head_and_encoder, load_head

    check_step(step)
    check_number("batch", batch, AT_LEAST_ONE)
    check_number("chunk_voxels", chunk_voxels, AT_LEAST_ONE)
    started = time.perf_counter()
    device = resolve_device(device)
    if subject_id is None:
        subject_id = subject_of_image(store, image)
    store_atlas_and_transform(store, subject_id)  # cheap checks first: registration, atlas
    if encoder is None:
        head, encoder, metadata = head_and_encoder(head_path, checkpoint, device)
    else:
        head, _, metadata = load_head(head_path, map_location=device)
        check_head_matches(head, encoder, head_path, "the given encoder")
    scan = prepare_scan(image, store, subject_id, lung_mask)
    work = work_dir_for(out)
    map_iso = probability_map(encoder, head, scan, step=step, region=region,
                              batch=batch, device=device, amp=amp,
                              chunk_voxels=chunk_voxels, work_dir=work, progress=progress)
    original = scan.original
    on_grid = to_original_grid(map_iso, scan.iso.affine, original.array.shape, original.affine)
    path = write_map(out, on_grid, original.affine, percent=percent)
    shutil.rmtree(work, ignore_errors=True)
    targets = scan.lung if region is None else scan.lung & region
    return DenseMapResult(path, subject_id, metadata["label"], step, int(targets.sum()),
                          time.perf_counter() - started, map_iso, scan, targets,
                          metadata["training_subjects"], Path(head_path))


