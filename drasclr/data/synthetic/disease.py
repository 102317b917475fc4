"""Disease painted into a copy of the template: emphysema subtypes (copd) or COVID-19 opacities.

All lesions are drawn in template space, inside the lungs, before the subject is sampled, so
they follow the subject's pose and deformation and their masks are exact. Each subtype is
painted until its planned share of the lung volume is reached:

- centrilobular (label 1): clusters of small holes (-1000 to -985 HU, radius 2-3.5 mm), centres
  weighted to the upper zones and at least ``CLE_MIN_DEPTH_MM`` (times the size scale, plus
  3 mm) from the pleura; painted only away from the pleura;
- paraseptal (label 2): subpleural holes and occasional bullae whose voxels stay within
  ``PARASEPTAL_MAX_DEPTH_MM`` of the pleural surface;
- panlobular (label 3): smooth diffuse density loss in the lower zones: HU moves towards air by
  a subject-specific fraction (60-90%, reached over the blob's edge), so many panlobular voxels
  stay above -950 HU;
- COVID (labels 1 ground-glass, 2 consolidation): patchy smooth blobs, peripheral and lower-zone
  predominant; ground glass at -650 to -400 HU, consolidation at -60 to 40 HU in the blob cores.

Lesions are returned with their centres (template mm), which become the annotation boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drasclr.data.synthetic.anatomy import HU_AIR, HU_PARENCHYMA, TemplateAnatomy

CENTRILOBULAR, PARASEPTAL, PANLOBULAR = 1, 2, 3
GROUND_GLASS, CONSOLIDATION = 1, 2
COPD_LABELS = {CENTRILOBULAR: "centrilobular", PARASEPTAL: "paraseptal", PANLOBULAR: "panlobular"}
COVID_LABELS = {GROUND_GLASS: "ground_glass", CONSOLIDATION: "consolidation"}

CLE_MIN_DEPTH_MM = 12.0
PARASEPTAL_MAX_DEPTH_MM = 10.0
#: Painting rounds per subtype; each round aims at the remaining volume.
ROUNDS = 6


@dataclass(frozen=True)
class Lesions:
    """A subject's disease in template space."""

    hu: np.ndarray  # float32 HU of the template with disease
    labels: np.ndarray  # uint8 lesion labels (0 none)
    centres: list[tuple[int, np.ndarray]]  # (label, template mm) of each painted cluster

    def fractions(self, lung: np.ndarray, names: dict[int, str]) -> dict[str, float]:
        """Realised share of the lung volume per lesion type."""
        counts = np.bincount(self.labels[lung > 0], minlength=max(names) + 1)
        total = max(int(np.count_nonzero(lung)), 1)
        return {name: float(counts[label]) / total for label, name in names.items()}


def lung_sampling(template: TemplateAnatomy) -> tuple[np.ndarray, ...]:
    """Flat indices, template mm, pleural depth and zone of the template's lung voxels."""
    lung_index = np.flatnonzero(template.lung)
    voxels = np.unravel_index(lung_index, template.lung.shape)
    lung_mm = np.stack(voxels, 1) * np.diag(template.affine)[:3] + template.affine[:3, 3]
    depth = template.pleura_distance.ravel()[lung_index]
    return lung_index, lung_mm, depth, template.zone(lung_mm[:, 2])


class _Painter:
    """Samples lung positions by weight and paints clusters of spheres or smooth blobs."""

    def __init__(self, template: TemplateAnatomy, rng: np.random.Generator,
                 sampling: tuple | None = None):
        """``sampling``: the template's ``lung_sampling`` when already computed."""
        self.template, self.rng = template, rng
        self.hu = template.hu.copy()
        self.labels = np.zeros(template.lung.shape, np.uint8)
        self.centres: list[tuple[int, np.ndarray]] = []
        self.spacing, self.origin = np.diag(template.affine)[:3], template.affine[:3, 3]
        self.lung_index, self.lung_mm, self.depth, self.zone = sampling or lung_sampling(template)

    def sample(self, weights: np.ndarray, count: int) -> np.ndarray:
        """(count, 3) template mm of lung voxels drawn with probability ~ ``weights``."""
        chosen = self.rng.choice(len(weights), size=count, p=weights / weights.sum())
        return self.lung_mm[chosen] + self.rng.uniform(-0.5, 0.5, (count, 3))

    def box(self, low_mm: np.ndarray, high_mm: np.ndarray):
        """Index slices and world axes of the grid box covering [low, high] mm, or None."""
        shape = np.asarray(self.labels.shape)
        low = np.maximum(np.floor((low_mm - self.origin) / self.spacing).astype(int), 0)
        high = np.minimum(np.ceil((high_mm - self.origin) / self.spacing).astype(int) + 1, shape)
        if np.any(high <= low):
            return None
        slices = tuple(slice(l, h) for l, h in zip(low, high))
        axes = [np.arange(l, h) * s + o for l, h, s, o in zip(low, high, self.spacing, self.origin)]
        return slices, (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

    def paint_spheres(self, centres: np.ndarray, radii: np.ndarray, label: int, hole_hu,
                      depth_range: tuple[float, float]) -> int:
        """Paint the union of spheres (the first is the cluster's seed) as holes.

        Only lung voxels not yet diseased and with pleural depth within ``depth_range`` change.
        """
        found = self.box(centres.min(0) - radii.max() - 1, centres.max(0) + radii.max() + 1)
        if found is None:
            return 0
        slices, (px, py, pz) = found
        inside = np.zeros(self.labels[slices].shape, bool)
        for (cx, cy, cz), radius in zip(centres, radii):
            inside |= (px - cx) ** 2 + (py - cy) ** 2 + (pz - cz) ** 2 < radius**2
        depth = self.template.pleura_distance[slices]
        inside &= (self.template.lung[slices] > 0) & (self.labels[slices] == 0)
        inside &= (depth >= depth_range[0]) & (depth <= depth_range[1])
        count = int(np.count_nonzero(inside))
        if count:
            self.labels[slices][inside] = label
            self.hu[slices][inside] = hole_hu(count)
            self.centres.append((label, centres[0]))  # the cluster's seed
        return count

    def blob_field(self, centres: np.ndarray, sigmas: np.ndarray, field: np.ndarray) -> None:
        """Max-combine Gaussian blobs exp(-d^2 / 2 sigma^2) into ``field`` (in place)."""
        for centre, sigma in zip(centres, sigmas):
            found = self.box(centre - 2.5 * sigma, centre + 2.5 * sigma)
            if found is None:
                continue
            slices, (px, py, pz) = found
            blob = np.exp(-((px - centre[0]) ** 2 + (py - centre[1]) ** 2
                            + (pz - centre[2]) ** 2) / (2 * sigma**2)).astype(np.float32)
            np.maximum(field[slices], blob, out=field[slices])


def paint_emphysema(template: TemplateAnatomy, shares: dict[str, float],
                    rng: np.random.Generator) -> Lesions:
    """Emphysema with planned lung-volume ``shares`` of centrilobular/paraseptal/panlobular."""
    painter = _Painter(template, rng)
    total = len(painter.lung_index)
    k = template.size.scale

    def holes(count: int) -> np.ndarray:
        return rng.uniform(-1000, -985, count).astype(np.float32)

    cle_depth = CLE_MIN_DEPTH_MM * k + 3.0
    cle_weight = painter.zone**2 * (painter.depth >= cle_depth)
    pse_weight = (0.5 + painter.zone) * (painter.depth >= 1.0) * (painter.depth <= 4.0)
    for label, weight, spheres, spread, radius, depth_range in (
        (CENTRILOBULAR, cle_weight, (4, 10), 3.0, (2.0, 3.5), (cle_depth / 2, np.inf)),
        (PARASEPTAL, pse_weight, (1, 4), 2.5, (2.5, 5.0), (0.0, PARASEPTAL_MAX_DEPTH_MM)),
    ):
        target = shares[COPD_LABELS[label]] * total
        painted = 0
        mean_volume = np.mean(spheres) * 4 / 3 * np.pi * np.mean(radius) ** 3 * 0.5
        for _ in range(ROUNDS):
            if painted >= target or not weight.any():
                break
            count = int(np.ceil((target - painted) / mean_volume))
            for centre in painter.sample(weight, count):
                if painted >= target:
                    break
                m = rng.integers(*spheres, endpoint=True)
                radii = rng.uniform(*radius, m)
                if label == PARASEPTAL and rng.random() < 0.15:
                    radii[0] = rng.uniform(5.0, 8.0)  # a bulla, centred on the pleura
                centres = centre + rng.normal(0, spread, (m, 3))
                centres[0] = centre
                painted += painter.paint_spheres(centres, radii, label, holes, depth_range)

    target = shares[COPD_LABELS[PANLOBULAR]] * total
    if target > 0:
        free = (template.lung > 0) & (painter.labels == 0)
        weight = (1.0 - painter.zone) ** 3 * (painter.depth >= 2.0)
        field = _grow_blobs(painter, weight, (8.0 * k, 16.0 * k), 0.5, target, free)
        mask = (field > 0.5) & free
        # Density loss ramps up over the blob's edge to a subject-specific depth.
        loss = rng.uniform(0.6, 0.9) * np.clip((field[mask] - 0.5) / 0.2, 0.0, 1.0)
        painter.hu[mask] = HU_AIR + (painter.hu[mask] - HU_AIR) * (1 - loss)
        painter.labels[mask] = PANLOBULAR
    return Lesions(painter.hu, painter.labels, painter.centres)


def paint_covid(template: TemplateAnatomy, involvement: float,
                rng: np.random.Generator) -> Lesions:
    """Ground glass and consolidation over about ``involvement`` of the lung volume."""
    painter = _Painter(template, rng)
    total = len(painter.lung_index)
    k = template.size.scale
    if involvement > 0:
        lung = template.lung > 0
        weight = np.exp(-painter.depth / (12.0 * k)) * (1.3 - painter.zone) + 1e-3
        field = _grow_blobs(painter, weight, (8.0 * k, 18.0 * k), 0.4, involvement * total, lung)
        glass = (field > 0.4) & lung
        # Consolidation fills the blob cores, more of them in more extensive disease.
        solid = (field > 0.92 - 0.1 * involvement) & lung
        texture = painter.hu - HU_PARENCHYMA
        # Ground glass fades in over the blob's edge; vessels inside stay visible (max).
        weight = np.clip((field[glass] - 0.4) / 0.25, 0.0, 1.0)
        opacity = rng.uniform(-650, -400) + 0.5 * texture[glass]
        painter.hu[glass] = np.maximum(painter.hu[glass],
                                       painter.hu[glass] + weight * (opacity - painter.hu[glass]))
        painter.hu[solid] = rng.uniform(-60, 40) + 0.5 * texture[solid]
        painter.labels[glass] = GROUND_GLASS
        painter.labels[solid] = CONSOLIDATION
    return Lesions(painter.hu, painter.labels, painter.centres)


def _grow_blobs(painter: _Painter, weight: np.ndarray, sigma_range: tuple[float, float],
                threshold: float, target: float, region: np.ndarray) -> np.ndarray:
    """Add Gaussian blobs in rounds until ``field > threshold`` covers ``target`` voxels."""
    field = np.zeros(region.shape, np.float32)
    # Voxels above the threshold of one blob: a ball of radius sigma * sqrt(-2 ln threshold).
    radius = np.mean(sigma_range) * np.sqrt(-2 * np.log(threshold))
    blob_volume = 4 / 3 * np.pi * radius**3
    covered = 0
    for _ in range(4 * ROUNDS):
        if covered >= target:
            break
        count = max(1, int(0.5 * (target - covered) / blob_volume))
        centres = painter.sample(weight, count)
        painter.blob_field(centres, painter.rng.uniform(*sigma_range, count), field)
        covered = int(np.count_nonzero((field > threshold) & region))
    return field
