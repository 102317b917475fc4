"""Tubes: a space-filling pulmonary vessel tree and its rasterisation.

The tree fills a lung by recursive bisection of its territory, in the spirit of Kitaoka et al.
(J Appl Physiol 1999): a branch owns a cloud of points sampled in the lung, runs from its parent
towards the cloud's centroid, and splits the cloud by the plane through the centroid normal to
the cloud's longest axis into its two children's territories. Calibre follows Murray's law
(r_child = r_parent / 2^(1/3)), so vessels thin towards the periphery and the tree stays
inside the lung by construction.
"""
from __future__ import annotations

import numpy as np

#: Murray's law for a symmetric bifurcation.
MURRAY_RATIO = 2.0 ** (-1.0 / 3.0)

#: Fraction of the way from a branch's start to its territory's centroid where it splits.
BRANCH_REACH = 0.6

Segment = tuple[np.ndarray, np.ndarray, float]


def grow_vessel_tree(
    mask: np.ndarray,
    affine: np.ndarray,
    root: np.ndarray,
    root_radius: float,
    n_points: int,
    min_radius: float,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> list[Segment]:
    """Segments (start mm, end mm, radius mm) of a tree filling ``mask`` from ``root``.

    Args:
        mask: boolean territory on the grid of ``affine`` (identity orientation).
        root: world position of the tree's root (the hilum).
        n_points: points sampled in the territory; about 2 * n_points segments result.
        min_radius: branches thinner than this end at their territory's centroid.
        weights: optional non-negative density of the points on the grid (more points, so
            more and finer branches, where it is higher); uniform when None.
    """
    voxels = np.argwhere(mask)
    if len(voxels) == 0:
        raise ValueError("vessel territory is empty")
    count = min(n_points, len(voxels))
    if weights is None:
        chosen = voxels[rng.choice(len(voxels), size=count, replace=False)]
    else:
        density = weights[mask].astype(float)
        chosen = voxels[rng.choice(len(voxels), size=count, replace=False,
                                   p=density / density.sum())]
    points = chosen * np.diag(affine)[:3] + affine[:3, 3] + rng.uniform(-0.5, 0.5, chosen.shape)

    segments: list[Segment] = []
    stack = [(np.asarray(root, float), points, float(root_radius))]
    while stack:
        start, cloud, radius = stack.pop()
        centroid = cloud.mean(axis=0)
        if len(cloud) < 2 or radius * MURRAY_RATIO < min_radius:
            segments.append((start, centroid, radius))
            continue
        end = start + BRANCH_REACH * (centroid - start)
        segments.append((start, end, radius))
        # Split along the cloud's principal axis: the two halves are the children's territories.
        centred = cloud - centroid
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        side = centred @ axis > 0
        for half in (cloud[side], cloud[~side]):
            if len(half):
                stack.append((end, half, radius * MURRAY_RATIO))
    return segments


def rasterise_segments(volume: np.ndarray, affine: np.ndarray, segments: list[Segment]) -> None:
    """Draw tubes into ``volume`` (in place) as partial-volume fractions in [0, 1], keeping the max.

    Each capsule (segment with radius r) is evaluated only inside its bounding box; a voxel at
    distance d from the axis gets ``clip(r + 0.5 - d, 0, 1)`` (a 1-voxel linear edge).
    """
    spacing, origin = np.diag(affine)[:3], affine[:3, 3]
    shape = np.asarray(volume.shape)
    for start, end, radius in segments:
        low = np.floor((np.minimum(start, end) - radius - 1 - origin) / spacing).astype(int)
        high = np.ceil((np.maximum(start, end) + radius + 1 - origin) / spacing).astype(int) + 1
        low, high = np.maximum(low, 0), np.minimum(high, shape)
        if np.any(high <= low):
            continue
        axes = [np.arange(lo, hi) * s + o for lo, hi, s, o in zip(low, high, spacing, origin)]
        px, py, pz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        direction = end - start
        length2 = float(direction @ direction)
        rel = (px - start[0], py - start[1], pz - start[2])
        t = (rel[0] * direction[0] + rel[1] * direction[1] + rel[2] * direction[2])
        t = np.clip(t / length2, 0.0, 1.0) if length2 > 0 else np.zeros_like(t)
        distance2 = sum((r - t * d) ** 2 for r, d in zip(rel, direction))
        fraction = np.clip(radius + 0.5 - np.sqrt(distance2), 0.0, 1.0)
        box = volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        np.maximum(box, fraction, out=box)
