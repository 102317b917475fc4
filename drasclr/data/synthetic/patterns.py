"""Version 2: emphysema patterns with their texture (Lynch et al., Radiology 2015, Fleischner
Society classification), painted in template space like version 1 (``disease.py``):

- centrilobular (label 1): a secondary lobule's centre keeps its lobular artery, a short
  tube, while holes open around it; some lobules show a thin wall, most do not; upper-zone
  and deep-lung predominant;
- paraseptal (label 2): a row of subpleural holes along the pleura, each with a thin wall,
  sometimes a bulla;
- panlobular (label 3): diffuse, uniform loss of lung density over the lower zones, the
  texture flattened and few vessels left.

Holes and destroyed lung also thin the vessel tree drawn afterwards (``vessel_keep``). The
centres of lobules and rows are returned: they become the annotation boxes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from drasclr.data.synthetic.anatomy import HU_AIR, HU_BLOOD, TemplateAnatomy
from drasclr.data.synthetic.disease import (
    CENTRILOBULAR, CLE_MIN_DEPTH_MM, COPD_LABELS, PANLOBULAR, PARASEPTAL,
    PARASEPTAL_MAX_DEPTH_MM, ROUNDS, Lesions, _grow_blobs, _Painter, lung_sampling,
)
from drasclr.data.synthetic.subject_anatomy import chest_geometry
from drasclr.data.synthetic.vessels import rasterise_segments

#: Hole air (HU) and the walls that stay visible (HU); the share of lobules with a wall.
HOLE_HU = (-1000.0, -985.0)
CLE_WALL_HU, PARASEPTAL_WALL_HU = -820.0, -760.0
CLE_WALL_PROBABILITY = 0.3
WALL_MM = 0.8
#: Hole radii (mm) and holes per lobule or row.
CLE_HOLE_RADIUS_MM, CLE_HOLES = (2.5, 4.5), (4, 8)
PARASEPTAL_HOLE_RADIUS_MM, PARASEPTAL_HOLES = (2.5, 4.0), (3, 7)
BULLA_PROBABILITY, BULLA_RADIUS_MM = 0.1, (4.0, 7.0)
#: Lobular artery left in a centrilobular lobule: radius and length (mm).
LOBULAR_ARTERY_MM = (0.6, 4.0)
#: Panlobular: density loss (share of tissue gone), texture kept, vessels kept.
PANLOBULAR_LOSS = (0.7, 0.95)
PANLOBULAR_TEXTURE = 0.3
VESSEL_KEEP = {CENTRILOBULAR: 0.3, PARASEPTAL: 0.3, PANLOBULAR: 0.35}


@dataclass(frozen=True)
class PatternLesions(Lesions):
    """Lesions plus the factor (0-1) by which the vessel tree survives at each voxel and the
    lobular arteries to draw."""

    vessel_keep: np.ndarray = None
    arteries: list = None


@functools.lru_cache(maxsize=2)
def _lung_sampling(size: str) -> tuple[np.ndarray, ...]:
    """``lung_sampling`` of the version-2 grid of ``size`` (shared by every subject)."""
    return lung_sampling(chest_geometry(size).template)


class _PatternPainter(_Painter):
    """Paints holes with optional thin walls."""

    def paint_holes(self, centres: np.ndarray, radii: np.ndarray, label: int,
                    wall_hu: float | None, depth_range: tuple[float, float],
                    seed: np.ndarray) -> int:
        found = self.box(centres.min(0) - radii.max() - 1, centres.max(0) + radii.max() + 1)
        if found is None:
            return 0
        slices, (px, py, pz) = found
        interior = np.zeros(self.labels[slices].shape, bool)
        shell = np.zeros_like(interior)
        inner_radii = radii - (WALL_MM if wall_hu is not None else 0.0)
        for (cx, cy, cz), radius, inner in zip(centres, radii, inner_radii):
            distance2 = (px - cx) ** 2 + (py - cy) ** 2 + (pz - cz) ** 2
            interior |= distance2 < inner**2
            shell |= distance2 < radius**2
        shell &= ~interior
        depth = self.template.pleura_distance[slices]
        allowed = (self.template.lung[slices] > 0) & (self.labels[slices] == 0)
        allowed &= (depth >= depth_range[0]) & (depth <= depth_range[1])
        interior &= allowed
        shell &= allowed
        count = int(np.count_nonzero(interior) + np.count_nonzero(shell))
        if count:
            self.labels[slices][interior | shell] = label
            self.hu[slices][interior] = self.rng.uniform(*HOLE_HU, int(interior.sum()))
            if wall_hu is not None:
                self.hu[slices][shell] = wall_hu
            self.centres.append((label, seed))
        return count

    def pleural_normal(self, point: np.ndarray) -> tuple[np.ndarray, float]:
        """Unit vector from the pleura into the lung at ``point`` (pleural depth gradient),
        and the pleural depth there."""
        index = np.clip(np.rint((point - self.origin) / self.spacing).astype(int), 1,
                        np.asarray(self.labels.shape) - 2)
        depth = self.template.pleura_distance
        gradient = np.array([depth[tuple(index + e)] - depth[tuple(index - e)]
                             for e in np.eye(3, dtype=int)], float)
        norm = np.linalg.norm(gradient)
        normal = gradient / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
        return normal, float(depth[tuple(index)])


def paint_emphysema_patterns(template: TemplateAnatomy, shares: dict[str, float],
                             rng: np.random.Generator) -> PatternLesions:
    """Emphysema of planned lung-volume ``shares`` with each subtype's texture."""
    painter = _PatternPainter(template, rng, _lung_sampling(template.size.name))
    total = len(painter.lung_index)
    k = template.size.scale
    arteries = []
    cle_depth = CLE_MIN_DEPTH_MM * k + 3.0
    weights = {
        CENTRILOBULAR: painter.zone**2 * (painter.depth >= cle_depth),
        PARASEPTAL: (0.5 + painter.zone) * (painter.depth >= 1.0) * (painter.depth <= 4.0),
    }
    for label in (CENTRILOBULAR, PARASEPTAL):
        target, painted = shares[COPD_LABELS[label]] * total, 0
        radius_range, holes = ((CLE_HOLE_RADIUS_MM, CLE_HOLES) if label == CENTRILOBULAR
                               else (PARASEPTAL_HOLE_RADIUS_MM, PARASEPTAL_HOLES))
        mean_volume = np.mean(holes) * 4 / 3 * np.pi * np.mean(radius_range) ** 3 * 0.5
        for _ in range(ROUNDS):
            if painted >= target or not weights[label].any():
                break
            for seed in painter.sample(weights[label], int(np.ceil((target - painted)
                                                                   / mean_volume))):
                if painted >= target:
                    break
                m = rng.integers(*holes, endpoint=True)
                radii = rng.uniform(*radius_range, m)
                if label == CENTRILOBULAR:
                    # Holes around the lobule's centre, which keeps its artery.
                    directions = rng.normal(size=(m, 3))
                    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
                    centres = seed + directions * (radii * rng.uniform(0.7, 1.1, m))[:, None]
                    wall = CLE_WALL_HU if rng.random() < CLE_WALL_PROBABILITY else None
                    count = painter.paint_holes(centres, radii, label, wall,
                                                (cle_depth / 2, np.inf), seed)
                    if count:
                        axis = rng.normal(size=3)
                        axis *= LOBULAR_ARTERY_MM[1] / 2 / np.linalg.norm(axis)
                        arteries.append((seed - axis, seed + axis, LOBULAR_ARTERY_MM[0]))
                else:
                    if rng.random() < BULLA_PROBABILITY:
                        radii = rng.uniform(*BULLA_RADIUS_MM, 1)
                    # A row along the pleura: step tangentially, each hole touching the pleura.
                    normal, depth = painter.pleural_normal(seed)
                    tangent = np.cross(normal, rng.normal(size=3))
                    tangent /= np.linalg.norm(tangent)
                    offsets = np.concatenate([[0.0], np.cumsum(radii[:-1] + radii[1:])])
                    centres = seed + offsets[:, None] * tangent
                    centres += normal * (0.7 * radii - depth)[:, None]
                    count = painter.paint_holes(centres, radii, label, PARASEPTAL_WALL_HU,
                                                (0.0, PARASEPTAL_MAX_DEPTH_MM), seed)
                painted += count

    target = shares[COPD_LABELS[PANLOBULAR]] * total
    if target > 0:
        free = (template.lung > 0) & (painter.labels == 0)
        weight = (1.0 - painter.zone) ** 3 * (painter.depth >= 2.0)
        field = _grow_blobs(painter, weight, (8.0 * k, 16.0 * k), 0.5, target, free)
        mask = (field > 0.5) & free
        loss = rng.uniform(*PANLOBULAR_LOSS) * np.clip((field[mask] - 0.5) / 0.2, 0.0, 1.0)
        # Uniform destruction: the lung's own texture mostly gone with its tissue.
        mean = float(np.mean(painter.hu[mask]))
        flattened = mean + PANLOBULAR_TEXTURE * (painter.hu[mask] - mean)
        painter.hu[mask] = HU_AIR + (flattened - HU_AIR) * (1 - loss)
        painter.labels[mask] = PANLOBULAR
    keep = np.ones(template.lung.shape, np.float32)
    for label, factor in VESSEL_KEEP.items():
        keep[painter.labels == label] = factor
    return PatternLesions(painter.hu, painter.labels, painter.centres, keep, arteries)


def add_lobular_arteries(hu: np.ndarray, affine: np.ndarray, arteries: list) -> None:
    """Draw the arteries left in centrilobular lobules (after the vessel tree)."""
    if arteries:
        fraction = np.zeros(hu.shape, np.float32)
        rasterise_segments(fraction, affine, arteries)
        hu += fraction * (HU_BLOOD - hu)
