"""The healthy template anatomy: one chest built from implicit surfaces in template space.

World coordinates are millimetres in nibabel's RAS+ convention (x towards the patient's right,
y anterior, z superior) with the origin at the centre of the template's field of view; the
template grid is 1 mm isotropic with identity orientation (the default atlas).
Every subject is this anatomy under its own pose and smooth deformation (``transform.py``) with
its own disease (``disease.py``).

Built, in painting order: body (skin, subcutaneous fat, muscle), ribs and sternum, spine with
discs, heart and aorta, two lungs (curved apices, dome-shaped diaphragm, cardiac notch,
posterior recesses), parenchymal texture (filtered noise, denser posteriorly as in a supine
scan), fissures, a space-filling pulmonary vessel tree (``vessels.py``), trachea and main
bronchi (air with walls). Lengths scale with ``SizeSpec.scale``: the small size is a physically half-size chest,
so that tests and the demo get few landmarks (docs/method.md#atlas-and-landmarks) and small volumes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from drasclr.data.synthetic.vessels import grow_vessel_tree, rasterise_segments

#: Lung labels of every mask written by the generator (lungmask's convention).
RIGHT_LUNG, LEFT_LUNG = 1, 2

# Hounsfield units of the tissues (unenhanced CT).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 35.0
HU_SKIN = 40.0
HU_MUSCLE = 50.0
HU_BLOOD = 45.0
HU_PARENCHYMA = -860.0
HU_TRABECULAR = 250.0
HU_CORTICAL = 700.0
HU_RIB = 600.0
HU_DISC = 70.0
HU_FISSURE = -700.0

#: Fixed seed of the template: every cohort of one size shares one atlas.
TEMPLATE_SEED = 20230401


@dataclass(frozen=True)
class SizeSpec:
    """Physical scale of the anatomy, template field of view and subject scanner ranges."""

    name: str
    scale: float
    template_extent_mm: tuple[int, int, int]
    inplane_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    vessel_points: int
    vessel_min_radius_mm: float
    deformation_rms_mm: float


SIZES = {
    "full": SizeSpec("full", 1.0, (270, 190, 270), (0.65, 0.8), (0.8, 1.25), 1500, 0.45, 0.8),
    "small": SizeSpec("small", 0.5, (150, 136, 150), (1.2, 1.35), (1.2, 1.6), 300, 0.6, 0.5),
}


def size_spec(size: str) -> SizeSpec:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


@dataclass(frozen=True)
class TemplateAnatomy:
    """The healthy template on its 1 mm grid.

    Attributes:
        hu: (X, Y, Z) float32 Hounsfield units, noise-free, no scanner effects.
        lung: (X, Y, Z) uint8: 0 outside, 1 right lung (larger x), 2 left lung.
        pleura_distance: (X, Y, Z) float32 mm from each lung voxel to the nearest non-lung
            voxel (0 outside the lungs).
        affine: (4, 4) voxel index -> template world mm (RAS+).
        lung_z_range: (lowest, highest) world z of lung voxels, for upper/lower zones.
        size: the size specification it was built for.
    """

    hu: np.ndarray
    lung: np.ndarray
    pleura_distance: np.ndarray
    affine: np.ndarray
    lung_z_range: tuple[float, float]
    size: SizeSpec

    def world_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 world coordinates (x, y, z) of the grid's voxel centres."""
        return _world_axes(self.hu.shape, self.affine)

    def zone(self, z_mm: np.ndarray) -> np.ndarray:
        """Height within the lungs: 0 at the lowest lung voxel, 1 at the apex."""
        low, high = self.lung_z_range
        return np.clip((np.asarray(z_mm) - low) / (high - low), 0.0, 1.0)


def template_affine(spec: SizeSpec) -> np.ndarray:
    """1 mm identity-oriented grid centred on the world origin."""
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(spec.template_extent_mm, float) - 1) / 2
    return affine


def _world_axes(shape, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (np.arange(shape[0]) * affine[0, 0] + affine[0, 3]).astype(np.float32)
    y = (np.arange(shape[1]) * affine[1, 1] + affine[1, 3]).astype(np.float32)
    z = (np.arange(shape[2]) * affine[2, 2] + affine[2, 3]).astype(np.float32)
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _inside_ellipse(x, y, ax, by, cy=0.0):
    return (x / ax) ** 2 + ((y - cy) / by) ** 2 < 1.0


@dataclass(frozen=True)
class Chest:
    """The chest without parenchyma, vessels or airways, shared by every version's anatomy.

    Attributes:
        hu: (X, Y, Z) float32 HU of body wall, bones, heart and aorta; air elsewhere.
        lung: (X, Y, Z) uint8 lung labels before the airways are cut out.
        axes: broadcastable world coordinates (x, y, z) of the grid.
    """

    hu: np.ndarray
    lung: np.ndarray
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]


def chest(spec: SizeSpec) -> Chest:
    """Body wall (skin, fat, muscle), ribs and sternum, spine, heart, aorta and the two lungs."""
    k = spec.scale
    affine = template_affine(spec)
    shape = spec.template_extent_mm
    x, y, z = _world_axes(shape, affine)
    hu = np.full(shape, HU_AIR, np.float32)

    # Body wall as nested elliptic cylinders: skin, fat, muscle, then the inner soft tissue.
    body_ax, body_by, body_cy = 125 * k, 88 * k, -3 * k
    skin, fat, muscle = max(2 * k, 1.5), 10 * k, 10 * k
    for thickness, value in ((0.0, HU_SKIN), (skin, HU_FAT), (skin + fat, HU_MUSCLE),
                             (skin + fat + muscle, HU_SOFT)):
        inside = _inside_ellipse(x, y, body_ax - thickness, body_by - thickness, body_cy)
        hu[np.broadcast_to(inside, shape)] = value
    wall = skin + fat + muscle

    # Ribs: a ring just inside the muscle layer, cut into bands that slope down anteriorly;
    # the anterior cartilage gap is left as soft tissue.
    ring = _inside_ellipse(x, y, body_ax - wall + 8 * k, body_by - wall + 8 * k, body_cy) & ~(
        _inside_ellipse(x, y, body_ax - wall, body_by - wall, body_cy)
    )
    sloped = z + 0.35 * y
    rib_band = (np.mod(sloped, 26 * k) < 10 * k) & (np.abs(sloped) < 115 * k)
    ribs = ring & rib_band & ~((np.abs(x) < 35 * k) & (y > 0))
    hu[ribs] = HU_RIB
    sternum = (np.abs(x) < 15 * k) & (np.abs(y - (body_by + body_cy - wall + 4 * k)) < 5 * k)
    hu[np.broadcast_to(sternum & (z < 80 * k) & (z > -110 * k), shape)] = HU_RIB

    # Spine: vertebral bodies (cortical shell, trabecular core) separated by discs.
    spine_y, spine_r = -68 * k, 19 * k
    spine_radius = np.sqrt(x**2 + (y - spine_y) ** 2)
    disc = np.mod(z, 30 * k) < 6 * k
    hu[np.broadcast_to(spine_radius < spine_r, shape)] = HU_CORTICAL
    hu[np.broadcast_to(spine_radius < spine_r - max(2 * k, 1.5), shape)] = HU_TRABECULAR
    hu[(spine_radius < spine_r) & disc] = HU_DISC

    # Heart (left of the midline, anterior, low) and the descending aorta.
    heart_c, heart_r = (-10 * k, 22 * k, -58 * k), (46 * k, 38 * k, 40 * k)
    heart_q = sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), heart_c, heart_r))
    hu[heart_q < 1] = HU_BLOOD
    aorta = ((x + 22 * k) ** 2 + (y + 42 * k) ** 2 < (11 * k) ** 2) & (z < 60 * k)
    hu[np.broadcast_to(aorta, shape)] = HU_BLOOD

    lung = _lungs(x, y, z, k, shape, heart_q, spine_radius, aorta,
                  inner=_inside_ellipse(x, y, body_ax - wall - 2 * k, body_by - wall - 2 * k,
                                        body_cy))
    return Chest(hu, lung, (x, y, z))


@functools.lru_cache(maxsize=2)
def template_anatomy(size: str = "full") -> TemplateAnatomy:
    """Build (once per process and size; deterministic) the healthy template anatomy."""
    spec = size_spec(size)
    k = spec.scale
    affine = template_affine(spec)
    shape = spec.template_extent_mm
    base = chest(spec)
    hu, lung, (x, y, z) = base.hu, base.lung, base.axes
    rng = np.random.default_rng(TEMPLATE_SEED)
    in_lung = lung > 0
    # Supine gravity gradient: dependent (posterior) lung is denser.
    gradient = np.broadcast_to(-25.0 * np.clip(y / (60 * k), -1, 1), shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    texture *= 18.0 / texture.std()
    hu[in_lung] = HU_PARENCHYMA + gradient[in_lung] + texture[in_lung]
    _draw_fissures(hu, lung, x, y, z, k)

    # Vessels inside the lungs, blended by their partial-volume fraction.
    fraction = np.zeros(shape, np.float32)
    for label, side in ((RIGHT_LUNG, 1.0), (LEFT_LUNG, -1.0)):
        hilum = np.array([side * 42 * k, -10 * k, 0.0])
        segments = grow_vessel_tree(lung == label, affine, hilum, 6.0 * k, spec.vessel_points,
                                    spec.vessel_min_radius_mm, rng)
        rasterise_segments(fraction, affine, segments)
    fraction *= in_lung
    hu += fraction * (HU_BLOOD - hu)

    draw_central_airways(hu, lung, affine, k)

    pleura_distance = ndimage.distance_transform_edt(lung > 0).astype(np.float32)
    lung_z = z.ravel()[np.flatnonzero(np.any(lung > 0, axis=(0, 1)))]
    for array in (hu, lung, pleura_distance):
        array.setflags(write=False)
    return TemplateAnatomy(hu, lung, pleura_distance, affine,
                           (float(lung_z.min()), float(lung_z.max())), spec)


def _draw_fissures(hu, lung, x, y, z, k) -> None:
    """Blend the fissures (``fissure_fractions``) into ``hu`` in place."""
    for fraction in fissure_fractions(lung, x, y, z, k):
        hu += fraction * (HU_FISSURE - hu)


def fissure_fractions(lung, x, y, z, k) -> list[np.ndarray]:
    """Thin pleural planes, as a 1 mm partial-volume line: both oblique fissures (running from
    posterior-superior to anterior-inferior) and the right horizontal fissure, which exists
    only anterior to the right oblique fissure."""
    oblique = z - (-20 * k + 1.1 * (-y - 5 * k))  # signed height above the oblique plane
    horizontal = z - 10 * k
    right = (lung == RIGHT_LUNG) & (oblique > 0) & (y > -10 * k)
    return [np.clip(1.0 - distance, 0.0, 1.0) * inside
            for distance, inside in ((np.abs(oblique) / np.hypot(1.0, 1.1), lung > 0),
                                     (np.abs(horizontal), right))]


def central_airways(k: float) -> list:
    """Trachea and the two main bronchi as (start mm, end mm, lumen radius mm) segments."""
    carina = np.array([0.0, -20 * k, 30 * k])
    airways = [(np.array([0.0, -20 * k, 200.0]), carina, 8 * k)]
    return airways + [(carina, main_bronchus_end(k, side), 5.5 * k) for side in (1, -1)]


def main_bronchus_end(k: float, side: float) -> np.ndarray:
    """Where the right (side 1) or left (-1) main bronchus enters its lung."""
    return np.array([side * 40 * k, -14 * k, 5 * k])


def draw_central_airways(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, k: float) -> None:
    """Trachea and main bronchi: air lumen with a soft-tissue wall, cut out of the lungs."""
    airways = central_airways(k)
    wall_mm = max(2 * k, 1.5)
    tube = np.zeros(hu.shape, np.float32)
    rasterise_segments(tube, affine, [(a, b, r + wall_mm) for a, b, r in airways])
    hu[tube > 0.5] = HU_MUSCLE
    tube[:] = 0
    rasterise_segments(tube, affine, airways)
    hu[tube > 0.5] = HU_AIR
    lung[tube > 0.5] = 0


def _lungs(x, y, z, k, shape, heart_q, spine_radius, aorta, inner) -> np.ndarray:
    """Label map of the two lungs: ellipsoidal apex, elliptic section, domed diaphragm."""
    lung = np.zeros(shape, np.uint8)
    cy, cz, ax, ay, az = -4 * k, -5 * k, 44 * k, 62 * k, 105 * k
    for label, side in ((RIGHT_LUNG, 1.0), (LEFT_LUNG, -1.0)):
        cx = side * 56 * k
        r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        # The liver lifts the right hemidiaphragm; the posterior recesses reach lowest.
        dome = (cz - 95 * k + 40 * k * (1 - np.minimum(r2, 1)) + (10 * k if side > 0 else 0)
                - 12 * k * np.clip(-(y - cy) / ay, 0, 1))
        apex = r2 + ((z - cz) / az) ** 2 < 1
        base = (r2 < 1) & (z < cz) & (z > dome)
        lung[(apex | base) & inner & (side * x > 14 * k)] = label
    excluded = (heart_q < 1.2) | (spine_radius < 30 * k) | aorta
    lung[np.broadcast_to(excluded, shape)] = 0
    return lung
