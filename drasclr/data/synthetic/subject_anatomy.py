"""Version 2: each subject's own lung tissue on the template grid, and the atlas.

The chest's geometry (body wall, bones, heart, lungs, trachea and main bronchi: ``anatomy.py``)
is shared and built once per size; a subject's shape comes from its mapping (``shape.py``).
Everything inside the lungs is the subject's own, drawn from its generator:

- normal parenchyma whose density depends on location on the scale of lesion contrast:
  dependent (posterior) lung denser, bases denser than apices, the core denser than the
  subpleural rind, plus two-scale texture;
- a vessel tree grown from the hilum, denser in the dependent and lower lung, with distal
  branches pruned and thinned by the subject's vessel loss;
- an intrapulmonary airway tree (lobar to subsegmental tubes with walls) whose wall area
  fraction and lumen follow the subject's airway disease;
- mosaic attenuation: lobular-scale patches, slightly lucent with thinner vessels, over the
  subject's small-airway disease share;
- inspiration: lung tissue density scales with 1 / (scan volume / full-inspiration volume).

The atlas (``atlas_anatomy``) is the same model with its own seed, no disease and full
inspiration, at the mean shape: it is none of the subjects.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from drasclr.data.synthetic.anatomy import (
    HU_AIR, HU_BLOOD, HU_FISSURE, HU_MUSCLE, LEFT_LUNG, RIGHT_LUNG, TemplateAnatomy, chest,
    draw_central_airways, fissure_fractions, main_bronchus_end, size_spec, template_affine,
)
from drasclr.data.synthetic.vessels import grow_vessel_tree, rasterise_segments

#: Atlas seed: the atlas is drawn like a subject but from none of the subjects' generators.
ATLAS_SEED = 20260401
#: Normal lung at full inspiration (HU) and its location terms (HU), docs/synthetic_cohort.md.
HU_LUNG = -890.0
GRAVITY_HU = 30.0  # posterior minus anterior, half of it each side of the middle
APEX_BASE_HU = 15.0  # bases denser, apices lighter, by this each
CORE_RIND_HU = 10.0  # deep lung denser, subpleural rind lighter, by this each
TEXTURE_FINE_HU, TEXTURE_COARSE_HU = 14.0, 8.0
#: Mosaic attenuation of small-airway disease on an inspiratory scan: faint.
MOSAIC_HU = -20.0
MOSAIC_VESSEL_SCALE = 0.7
#: Vessel points are this much denser at the dependent and lower lung than elsewhere.
VESSEL_DEPENDENT_GAIN = 0.5
#: Distal branches (thinner than this many minimum radii) can be pruned.
DISTAL_RADII = 2.0
#: Intrapulmonary airway tree: lumen radius at the main bronchus end and its smallest branch.
AIRWAY_ROOT_RADIUS = 4.4
AIRWAY_MIN_RADIUS = 2.0
AIRWAY_POINTS = 24


@dataclass(frozen=True)
class ChestGeometry:
    """The shared geometry of every version-2 subject on the template grid.

    ``template`` carries the chest HU (no lung tissue), lung labels, pleural depth and zones;
    ``fissures`` the fissures' partial-volume fractions; ``axes`` the world coordinates.
    """

    template: TemplateAnatomy
    fissures: list[np.ndarray]
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    in_lung: np.ndarray
    lung_box: tuple[slice, slice, slice]  # bounding box of the lungs: textures are drawn there


@functools.lru_cache(maxsize=2)
def chest_geometry(size: str) -> ChestGeometry:
    spec = size_spec(size)
    k = spec.scale
    affine = template_affine(spec)
    base = chest(spec)
    hu, lung = base.hu, base.lung
    draw_central_airways(hu, lung, affine, k)
    x, y, z = base.axes
    pleura = ndimage.distance_transform_edt(lung > 0).astype(np.float32)
    lung_z = z.ravel()[np.flatnonzero(np.any(lung > 0, axis=(0, 1)))]
    fissures = fissure_fractions(lung, x, y, z, k)
    for array in (hu, lung, pleura, *fissures):
        array.setflags(write=False)
    template = TemplateAnatomy(hu, lung, pleura, affine,
                               (float(lung_z.min()), float(lung_z.max())), spec)
    box = tuple(slice(int(np.min(i)), int(np.max(i)) + 1) for i in np.nonzero(lung))
    return ChestGeometry(template, fissures, (x, y, z), lung > 0, box)


def normal_lung(geometry: ChestGeometry, rng: np.random.Generator) -> np.ndarray:
    """A float32 copy of the chest with normal, location-dependent parenchyma in the lungs."""
    template, (x, y, z) = geometry.template, geometry.axes
    k = template.size.scale
    box = geometry.lung_box
    in_lung = geometry.in_lung[box]
    shape = in_lung.shape
    hu = template.hu.copy()
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.0 * k)
    depth = template.pleura_distance[box][in_lung]
    posterior = np.broadcast_to(-np.clip(y[:, box[1]] / (60 * k), -1, 1), shape)[in_lung]
    zone = np.broadcast_to(template.zone(z[..., box[2]]), shape)[in_lung]
    hu[box][in_lung] = (HU_LUNG + GRAVITY_HU / 2 * posterior + APEX_BASE_HU * (1 - 2 * zone)
                   + CORE_RIND_HU * (2 * np.clip(depth / (20 * k), 0, 1) - 1)
                   + TEXTURE_FINE_HU / fine.std() * fine[in_lung]
                   + TEXTURE_COARSE_HU / coarse.std() * coarse[in_lung])
    return hu


def mosaic_mask(geometry: ChestGeometry, share: float, rng: np.random.Generator,
                free: np.ndarray) -> np.ndarray:
    """Lobular-scale patches covering ``share`` of the lung (within ``free`` voxels)."""
    box = geometry.lung_box
    in_lung = geometry.in_lung[box]
    shape = np.asarray(in_lung.shape)
    k = geometry.template.size.scale
    coarse = rng.standard_normal(tuple(shape // 4 + 1)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, max(2.5 * k, 1.0))
    field = ndimage.zoom(coarse, 4, order=1)[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(geometry.in_lung.shape, bool)
    if share > 0:
        cut = np.quantile(field[in_lung], 1.0 - share)
        mask[box] = in_lung & free[box] & (field > cut)
    return mask


def apply_inspiration(hu: np.ndarray, in_lung: np.ndarray, inspiration: float) -> None:
    """Lung tissue keeps its mass: HU + 1000 scales with 1 / (relative lung volume)."""
    hu[in_lung] = HU_AIR + (hu[in_lung] - HU_AIR) / inspiration


def add_vessels(hu: np.ndarray, geometry: ChestGeometry, rng: np.random.Generator,
                pruning: float, keep: np.ndarray | None) -> None:
    """Grow, prune and blend the subject's pulmonary vessel tree into ``hu`` (in place).

    ``pruning`` is the chance that a distal branch is missing; survivors thin by a third of it.
    ``keep`` (or None) scales the vessels' partial volume where disease destroyed them.
    """
    template, (x, y, z) = geometry.template, geometry.axes
    spec, k = template.size, template.size.scale
    shape = geometry.in_lung.shape
    density = 1 + VESSEL_DEPENDENT_GAIN * (np.broadcast_to(y < 0, shape)
                                           | np.broadcast_to(template.zone(z) < 0.5, shape))
    fraction = np.zeros(shape, np.float32)
    distal = DISTAL_RADII * spec.vessel_min_radius_mm
    for label, side in ((RIGHT_LUNG, 1.0), (LEFT_LUNG, -1.0)):
        hilum = np.array([side * 42 * k, -10 * k, 0.0])
        segments = grow_vessel_tree(template.lung == label, template.affine, hilum, 6.0 * k,
                                    spec.vessel_points, spec.vessel_min_radius_mm, rng,
                                    weights=density)
        lost = rng.random(len(segments)) < pruning
        segments = [(a, b, r * (1 - pruning / 3) if r < distal else r)
                    for (a, b, r), gone in zip(segments, lost) if not (gone and r < distal)]
        rasterise_segments(fraction, template.affine, segments)
    fraction *= geometry.in_lung
    if keep is not None:
        fraction *= keep
    hu += fraction * (HU_BLOOD - hu)


def add_airways(hu: np.ndarray, geometry: ChestGeometry, rng: np.random.Generator,
                wall_area: float, lumen_scale: float) -> None:
    """Intrapulmonary bronchi (lobar to subsegmental): soft-tissue walls around air.

    ``wall_area`` is the wall's share of the airway's cross-section (WA%, Nakano et al. 2000);
    ``lumen_scale`` narrows the lumen.
    """
    template = geometry.template
    k = template.size.scale
    wall = np.zeros(hu.shape, np.float32)
    lumen = np.zeros(hu.shape, np.float32)
    thickness = 1 / np.sqrt(1 - wall_area) - 1  # wall thickness over lumen radius
    for label, side in ((RIGHT_LUNG, 1.0), (LEFT_LUNG, -1.0)):
        segments = grow_vessel_tree(template.lung == label, template.affine,
                                    main_bronchus_end(k, side), AIRWAY_ROOT_RADIUS * k,
                                    AIRWAY_POINTS, AIRWAY_MIN_RADIUS * k, rng)
        inner = [(a, b, r * lumen_scale) for a, b, r in segments]
        rasterise_segments(wall, template.affine, [(a, b, r * (1 + thickness))
                                                   for a, b, r in inner])
        rasterise_segments(lumen, template.affine, inner)
    wall *= geometry.in_lung
    lumen *= geometry.in_lung
    hu += wall * (HU_MUSCLE - hu)
    hu += lumen * (HU_AIR - hu)


def add_fissures(hu: np.ndarray, geometry: ChestGeometry) -> None:
    for fraction in geometry.fissures:
        hu += fraction * (HU_FISSURE - hu)


@functools.lru_cache(maxsize=2)
def atlas_anatomy(size: str) -> TemplateAnatomy:
    """The version-2 atlas: a healthy subject of the mean shape with its own seed."""
    geometry = chest_geometry(size)
    rng = np.random.default_rng(ATLAS_SEED)
    hu = normal_lung(geometry, rng)
    add_vessels(hu, geometry, rng, pruning=0.0, keep=None)
    add_airways(hu, geometry, rng, wall_area=0.6, lumen_scale=1.0)
    add_fissures(hu, geometry)
    hu.setflags(write=False)
    template = geometry.template
    return TemplateAnatomy(hu, template.lung, template.pleura_distance, template.affine,
                           template.lung_z_range, template.size)
