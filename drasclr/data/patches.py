"""Cutting the landmark patches out of a subject's 1 mm volume (Yu et al. 2023, eq. 2;
docs/method.md#patches).

All patches are gathered at once through a strided view of every possible patch position
(``sliding_window_view``): one fancy-index, no per-landmark loop. The reference pads each
volume by 60 voxels of -1024 HU so that border patches are whole; here the volume is padded by
only what the patches actually need, with the same 60-voxel limit: a patch reaching further
outside the scan means the landmark mapping is wrong, and that is an error.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Edge of every landmark patch in voxels of the 1 mm grid, and the encoder's input size
#: (Yu et al. 2023, Section 3).
PATCH_SIZE = 32

#: HU of the padding: air, the bottom of the HU window.
AIR_HU = -1024

#: The reference's padding (voxels of air on each side) bounds how far a patch may stick out.
MAX_PAD = 60


def cut_patches(volume: np.ndarray, centres: np.ndarray, patch_size: int, fill: int = AIR_HU) -> np.ndarray:
    """Cut one cube of ``patch_size`` voxels per centre, padding with ``fill`` outside the volume.

    Args:
        volume: (X, Y, Z) the 1 mm volume (its dtype is kept).
        centres: (L, 3) voxel-index centres, fractional; a patch covers
            ``corner .. corner + patch_size - 1`` with ``corner = round(centre - (patch_size - 1) / 2)``,
            the same convention as ``Atlas.centres_voxel``.
        patch_size: edge of the cube in voxels.
    Returns:
        (L, P, P, P) patches, a copy.
    Raises:
        ValueError: a patch would reach more than ``MAX_PAD`` voxels beyond the volume.
    """
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3 or not np.isfinite(centres).all():
        raise ValueError(f"centres: expected finite (L, 3) voxel indices, got shape {centres.shape}")
    corners = np.rint(centres - (patch_size - 1) / 2.0).astype(np.int64)
    shape = np.asarray(volume.shape)
    pad_low = np.maximum(0, -corners.min(axis=0, initial=0))
    pad_high = np.maximum(0, (corners + patch_size).max(axis=0, initial=0) - shape)
    if max(pad_low.max(), pad_high.max()) > MAX_PAD:
        worst = int(np.argmax(np.maximum(-corners, corners + patch_size - shape).max(axis=1)))
        raise ValueError(
            f"landmark {worst} maps to voxel {np.round(centres[worst], 1).tolist()}, more than "
            f"{MAX_PAD} voxels outside the scan of shape {tuple(volume.shape)}; the registration "
            "is wrong or the scan does not cover the lungs"
        )
    if pad_low.any() or pad_high.any():
        volume = np.pad(volume, list(zip(pad_low, pad_high)), constant_values=fill)
    windows = sliding_window_view(volume, (patch_size,) * 3)
    corners = corners + pad_low
    return windows[corners[:, 0], corners[:, 1], corners[:, 2]]
