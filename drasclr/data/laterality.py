"""Does the image's header agree with the anatomy? A check for a mirrored header.

The right lung is larger than the left in most people (the heart sits left of the midline): a
right-to-left volume ratio of about 1.1-1.2. The lung segmentation names the lung on the side
of larger RAS x "right", so a header that mirrors x (a wrong sign in the affine, a mis-set
DICOM orientation) makes the image's "right" lung the anatomically left one, and the ratio
drops below 1. Real patients can show that too (after a lobectomy, with a collapsed or
diseased right lung, with situs inversus), so a low ratio is not a failure: the subject is
processed, and its manifest row carries a warning for a person to review.
"""
from __future__ import annotations

import math

import numpy as np

#: The manifest's quality column holding the ratio.
RIGHT_TO_LEFT = "right_to_left_volume"
#: Ratios below this get a warning: the right lung clearly smaller than the left.
MIN_RIGHT_TO_LEFT = 0.95


def right_to_left_ratio(labels: np.ndarray, right: int = 1, left: int = 2) -> float:
    """Voxels labelled ``right`` over voxels labelled ``left`` (inf without a left lung, 0
    without a right one); the labels share one grid, so voxel volume cancels."""
    right_voxels = int(np.count_nonzero(labels == right))
    left_voxels = int(np.count_nonzero(labels == left))
    return right_voxels / left_voxels if left_voxels else math.inf


def laterality_warning(ratio: float | None, minimum: float = MIN_RIGHT_TO_LEFT) -> str:
    """The manifest warning for a right-to-left lung volume ratio; "" when it looks normal
    (or was not measured)."""
    if ratio is None or math.isnan(ratio) or ratio >= minimum:
        return ""
    return (f"laterality: the lung on the image's right (larger RAS x) is {ratio:.2f} times the "
            f"volume of the left, below {minimum}; the right lung is normally the larger, so the "
            "header may be mirrored (left-right flipped). Review the orientation; disease, "
            "surgery or situs inversus can also cause this")
