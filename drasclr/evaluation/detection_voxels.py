"""The voxel-wise probability map inside each detection box, and the paper's box rule on it.

Yu et al. 2023 (Section 4.3.1) score subtype detection voxel by voxel: the fine-tuned
classifier gives every voxel the probability of its own 32^3 patch, and a 32 mm box counts as
detected when at least 25 % of its voxels have probability above 0.5. Here the fraction is
taken over the box's lung voxels (the rule of :mod:`drasclr.evaluation.densemap.scoring`):
counted over all voxels, a subpleural (paraseptal) box, half chest wall, could hardly reach it.

A step-1 map of a box is 32^3 forward passes. As ``drasclr densemap`` does, the patches are
evaluated on a grid of every ``step``-th voxel of the box (the last voxel of each axis added,
so no value is extrapolated) and the map is filled by trilinear interpolation; at ``step=1``
it is the exact map. The patch of box voxel b is ``regions[n, b:b+32, ...]`` of
:class:`~drasclr.evaluation.detection_patches.DetectionPatches`, its coordinate
``[*b, 1] @ box_coord_affine[n]``, so the values at the grid voxels are the ones a whole-scan
map would hold there. The patches run in the dense maps' arithmetic (bf16 autocast where it
pays, :data:`drasclr.evaluation.densemap.window.CPU_BF16`): the same per-voxel workload.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.interpolate import RegularGridInterpolator
from torch import nn
from tqdm import tqdm

from drasclr.evaluation.densemap.scoring import lung_fraction_above
from drasclr.evaluation.densemap.window import autocast
from drasclr.evaluation.detection_patches import BOX, DetectionPatches
from drasclr.intensity import normalise_hu

#: HU below which a lung voxel counts as low attenuation (LAA-950).
LAA_HU = -950


def box_grid(step: int) -> np.ndarray:
    """Box voxel positions evaluated along each axis: every ``step``-th one and the last."""
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step: expected a positive integer, got {step!r}")
    return np.unique(np.r_[np.arange(0, BOX, step), BOX - 1])


def box_samples(step: int) -> np.ndarray:
    """(M, 3) box voxels evaluated at ``step``: the grid of :func:`box_grid` on every axis."""
    grid = box_grid(step)
    return np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)


def check_boxes(data: DetectionPatches) -> None:
    """A clear error when ``data`` lacks the box arrays the voxel rule needs."""
    if not data.has_boxes:
        source = data.metadata.get("annotations", "the detection patches")
        raise ValueError(f"{source}: made without box regions (regions, box_lung, "
                         "box_coord_affine); recompute them with detection_patches")


@torch.no_grad()
def box_features(encoder: nn.Module, data: DetectionPatches, rows: np.ndarray, step: int,
                 batch_size: int = 64, device: str | torch.device = "cpu", amp: bool = True,
                 progress: bool = True) -> np.ndarray:
    """(len(rows), M, rep_dim) float32 representation h of the patch centred on each sample
    voxel (:func:`box_samples`) of each box ``rows``, with that voxel's own coordinate; under
    bf16 autocast where it pays when ``amp`` (``amp=False``: float32); ``progress``: a tqdm
    bar over the boxes."""
    check_boxes(data)
    samples = box_samples(step)
    encoder = encoder.eval().to(device)
    homogeneous = np.c_[samples, np.ones(len(samples))]
    out = np.empty((len(rows), len(samples), encoder.rep_dim), dtype=np.float32)
    boxes = tqdm(np.asarray(rows), desc=f"box maps ({len(samples)} voxels per box)",
                 unit="box", disable=not progress, leave=False)
    for k, row in enumerate(boxes):
        windows = sliding_window_view(data.regions[row], (BOX,) * 3)
        patches = windows[samples[:, 0], samples[:, 1], samples[:, 2]]
        coords = torch.as_tensor(homogeneous @ data.box_coord_affine[row], dtype=torch.float32)
        for start in range(0, len(samples), batch_size):
            x = normalise_hu(torch.from_numpy(np.ascontiguousarray(
                patches[start:start + batch_size])).to(device))[:, None]
            with autocast(device, amp):
                h = encoder(x, coords[start:start + batch_size].to(device))
            out[k, start:start + batch_size] = h.float().cpu().numpy()
    return out


def box_fractions(sample_probabilities: np.ndarray, box_lung: np.ndarray,
                  step: int) -> np.ndarray:
    """(N,) share of each box's lung voxels above 0.5 in its map, the map interpolated
    (trilinear) from the probabilities (N, M) at :func:`box_samples` ``(step)``; NaN for a box
    without lung voxels."""
    grid = box_grid(step)
    values = np.asarray(sample_probabilities, dtype=np.float64).reshape(-1, *(len(grid),) * 3)
    voxels = np.indices((BOX,) * 3).reshape(3, -1).T
    return np.array([lung_fraction_above(
        RegularGridInterpolator((grid, grid, grid), box_values)(voxels).reshape((BOX,) * 3), lung)
        for box_values, lung in zip(values, np.asarray(box_lung, bool))])


def box_laa950(data: DetectionPatches) -> np.ndarray:
    """(N,) percent of each box's lung voxels below -950 HU (all its voxels when the box holds
    no lung voxel): the density feature of the patch LAA-950 control."""
    check_boxes(data)
    inner = data.patches < LAA_HU  # the box is the centre patch
    lung = data.box_lung.reshape(len(data), -1)
    lung = np.where(lung.any(axis=1, keepdims=True), lung, True)
    return 100.0 * (inner.reshape(len(data), -1) & lung).sum(axis=1) / lung.sum(axis=1)
