"""Lung segmentation: a classical threshold-and-components method (default) or lungmask.

The paper segments with the lungmask U-net (Yu et al. 2023, Section 3), whose weights are
downloaded at run time; the default here needs no weights. Segmentation only feeds the
registration, which works on coarse masks (about 5 mm for an adult), so it runs on a 2 mm
block-averaged copy of the volume: eight times fewer voxels.

The classical method: air below -400 HU; air touching the edge of its axial slice is outside
the body; the trachea and main bronchi are followed down from the top slice as thin air regions
until they enter a lung, and removed; the largest component, and the second when lung-sized,
are the lungs; touching lungs are cut at the body's mid-sagittal plane; holes within each slice
(vessels) are filled. A scan that starts below the trachea, within the lungs, loses the thin
tips of the apices instead (a few slices).

Labels follow lungmask: 1 = right lung, 2 = left lung (the registration maps them to the
reference's 50/100). Right is the side of larger RAS x.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from drasclr.data.io import CTVolume

RIGHT, LEFT = 1, 2

SEGMENTATION_METHODS = ("classical", "lungmask")


@dataclass(frozen=True)
class LungMask:
    """Lung labels (0 outside, 1 right, 2 left) on a grid described by a RAS affine."""

    labels: np.ndarray
    affine: np.ndarray

    @property
    def volume_ml(self) -> float:
        voxel_ml = abs(np.linalg.det(self.affine[:3, :3])) / 1000.0
        return float(np.count_nonzero(self.labels) * voxel_ml)

    def on_grid(self, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        """These labels on another grid, nearest neighbour; 0 outside this mask's grid.

        For grids aligned with this one's axes (scaled and shifted, as the 1 mm volume is
        under the block-averaged grid the classical method segments on): one index table per
        axis and a single gather.

        Raises:
            ValueError: the grids are rotated or permuted relative to each other.
        """
        to_mask = np.linalg.inv(self.affine) @ affine
        scale = np.diag(to_mask[:3, :3])
        if not np.allclose(to_mask[:3, :3], np.diag(scale), atol=1e-6):
            raise ValueError("lung mask: the target grid is not aligned with the mask's axes")
        # the last index of each axis points at a slab of zeros added past the mask's end
        padded = np.pad(self.labels, [(0, 1)] * 3)
        index = []
        for axis, size in enumerate(shape):
            nearest = np.floor(scale[axis] * np.arange(size) + to_mask[axis, 3] + 0.5)
            inside = (nearest >= 0) & (nearest < self.labels.shape[axis])
            index.append(np.where(inside, nearest, -1).astype(np.intp))
        return padded[np.ix_(*index)]


def segment_lungs(
    volume: CTVolume,
    method: str = "classical",
    *,
    threshold: float = -400.0,
    working_spacing: float = 2.0,
    airway_area_mm2: float = 1000.0,
    fragment_distance_mm: float = 10.0,
) -> LungMask:
    """Segment the lungs of a CT volume (HU) into right (1) and left (2).

    Args:
        volume: the CT volume in HU.
        method: ``"classical"`` or ``"lungmask"`` (needs the lungmask package and its weights).
        threshold: HU below which a voxel is air (classical).
        working_spacing: mm; the classical method runs on block averages of about this size.
        airway_area_mm2: air regions of an axial slice smaller than this, followed down from
            the top slice, are the trachea and main bronchi (classical).
        fragment_distance_mm: smaller air regions this close to the lungs, and not under
            them, are pieces of lung cut off by disease (classical).
    """
    if method == "classical":
        return _segment_classical(volume, threshold, working_spacing, airway_area_mm2,
                                  fragment_distance_mm)
    if method == "lungmask":
        return _segment_lungmask(volume)
    raise ValueError(f"segmentation: expected one of {SEGMENTATION_METHODS}, got {method!r}")


def block_mean(array: np.ndarray, affine: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of ``factors`` voxels; returns (array, its RAS affine).

    The trailing partial block of each axis is dropped. Voxel 0 of the result is centred on the
    centre of the first block, so physical positions are kept.
    """
    factors = np.asarray(factors, dtype=int)
    sizes = np.asarray(array.shape) // factors
    cropped = array[: sizes[0] * factors[0], : sizes[1] * factors[1], : sizes[2] * factors[2]]
    blocks = cropped.reshape(sizes[0], factors[0], sizes[1], factors[1], sizes[2], factors[2])
    reduced = blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (factors - 1) / 2.0
    return reduced, affine @ scale


def split_left_right(lungs: np.ndarray, affine: np.ndarray, midline_x: float | None = None) -> np.ndarray:
    """Label a binary lung mask 1 (right) / 2 (left).

    Each connected component goes to the side of its centroid relative to the midline;
    touching lungs (one component, or one with a quarter or more of it on each side next to
    pieces cut off by disease) are cut along the sagittal plane ``x = midline_x`` (RAS mm;
    default: the centroid of the mask).
    """
    lungs = lungs.astype(bool)
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    if not lungs.any():
        return labels
    if midline_x is None:
        midline_x = float(np.asarray(ndimage.center_of_mass(lungs)) @ affine[0, :3] + affine[0, 3])
    world_x = _world_x(lungs.shape, affine)[lungs]
    on_right = world_x > midline_x
    components, count = ndimage.label(lungs)
    component = components[lungs]
    voxels = np.bincount(component)[1:]
    centroid_x = np.bincount(component, weights=world_x)[1:] / voxels
    right_share = np.bincount(component, weights=on_right)[1:] / voxels
    # A component with a quarter or more of it on each side of the plane is both lungs,
    # touching: it is cut along the plane.
    straddles = (right_share >= 0.25) & (right_share <= 0.75)
    by_centroid = centroid_x[component - 1] > midline_x
    right = np.where(straddles[component - 1] | (count == 1), on_right, by_centroid)
    labels[lungs] = np.where(right, RIGHT, LEFT)
    return labels


def _world_x(shape, affine: np.ndarray) -> np.ndarray:
    """RAS x (mm) of every voxel, as a broadcastable sum of per-axis terms."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    return (
        affine[0, 0] * i[:, None, None] + affine[0, 1] * j[None, :, None]
        + affine[0, 2] * k[None, None, :] + affine[0, 3]
    ).astype(np.float32)


def _segment_classical(volume, threshold, working_spacing, airway_area_mm2,
                       fragment_distance_mm) -> LungMask:
    factors = np.maximum(1, np.round(working_spacing / volume.spacing)).astype(int)
    hu, affine = block_mean(volume.array, volume.affine, factors)
    air = hu < threshold

    # The slice axis is the array axis closest to world z. Within each axial slice, air
    # touching the edge of the slice is outside the body. Slice by slice, because in 3D the
    # airways can join the lungs to the air above the body (the lungs may also touch the first
    # or last slice).
    slice_axis = int(np.argmax(np.abs(affine[2, :3])))
    in_plane = ndimage.generate_binary_structure(3, 1)
    for end in (0, 2):
        neighbour = [1, 1, 1]
        neighbour[slice_axis] = end
        in_plane[tuple(neighbour)] = False
    air_components, _ = ndimage.label(air, structure=in_plane)
    faces = [
        np.take(air_components, end, axis=axis)
        for axis in range(3) if axis != slice_axis for end in (0, -1)
    ]
    outside_air = air & np.isin(air_components, np.concatenate([f.ravel() for f in faces]))
    inside = air & ~outside_air

    inside &= ~_airways(air_components, inside, affine, slice_axis, airway_area_mm2)

    lungs = _lung_components(inside, affine, slice_axis, fragment_distance_mm)

    # Touching lungs are cut along the body's mid-sagittal plane.
    body_x = _world_x(lungs.shape, affine)[~outside_air]
    labels = split_left_right(lungs, affine, midline_x=float(body_x.mean()) if body_x.size else None)
    # Vessels and airway walls are holes within each axial slice of a lung.
    for side in (RIGHT, LEFT):
        filled = ndimage.binary_fill_holes(labels == side, structure=in_plane)
        labels[filled & (labels == 0)] = side
    return LungMask(labels, affine)


def _lung_components(inside: np.ndarray, affine: np.ndarray, slice_axis: int,
                     fragment_distance_mm: float) -> np.ndarray:
    """The lungs among the air regions inside the body.

    The largest region, and the second when it is lung-sized too, are the lungs. A tumour,
    consolidation or a fissure can cut a piece off a lung (an apex above a tumour): smaller
    regions of at least 1 ml within ``fragment_distance_mm`` of the lungs are kept too, unless
    they lie under the lungs (gas in the stomach or bowel, beneath the diaphragm's dome).
    """
    components, count = ndimage.label(inside)
    if not count:
        return np.zeros(inside.shape, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [c + 1 for c in order[:2] if sizes[c] >= 0.1 * sizes[order[0]]]
    lungs = np.isin(components, keep)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    candidates = [c + 1 for c in order[len(keep):] if sizes[c] * voxel_ml >= 1.0]
    if not candidates:
        return lungs
    # Under the lungs: a lung voxel somewhere above in the same column (superior = larger z).
    from_top = np.flip(lungs, slice_axis) if affine[2, slice_axis] > 0 else lungs
    under = np.logical_or.accumulate(from_top, axis=slice_axis)
    under = np.flip(under, slice_axis) if affine[2, slice_axis] > 0 else under
    margin = np.ceil(fragment_distance_mm / spacing).astype(int)
    boxes = ndimage.find_objects(components)
    fragments = []
    for label in candidates:
        region = components == label
        if np.count_nonzero(region & under) >= 0.5 * sizes[label - 1]:
            continue
        # The distance to the lungs within the fragment's box grown by the distance: small.
        box = tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(boxes[label - 1], margin))
        distance = ndimage.distance_transform_edt(~lungs[box], sampling=spacing)
        if lungs[box].any() and distance[region[box]].min() <= fragment_distance_mm:
            fragments.append(region)
    for region in fragments:
        lungs |= region
    return lungs


def _airways(
    components: np.ndarray, inside: np.ndarray, affine: np.ndarray, slice_axis: int,
    max_area_mm2: float, gap_mm: float = 6.0,
) -> np.ndarray:
    """The trachea and main bronchi: air followed down from the top slice while it stays thin.

    ``components`` labels the air of each axial slice separately. Starting from the most
    superior slice holding air inside the body (if that air is thin: above the lung apices, it
    is the trachea), each next slice's air regions that overlap the airway of the slice above
    and are smaller than ``max_area_mm2`` are airway; the tracking stops where the bronchi
    have entered the lungs, whose cross-section is large, for more than ``gap_mm``. One step
    per slice, each a whole-slice operation.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_area = float(np.prod(np.delete(spacing, slice_axis)))
    thin = np.bincount(components.ravel()) * voxel_area < max_area_mm2
    thin[0] = False
    slices = np.arange(inside.shape[slice_axis])
    if affine[2, slice_axis] > 0:  # superior first
        slices = slices[::-1]
    occupied = np.flatnonzero(np.take(inside, slices, axis=slice_axis).any(
        axis=tuple(a for a in range(3) if a != slice_axis)))
    airway_labels: list[np.ndarray] = []
    previous = None
    missed = 0
    for k in slices[occupied[0]:] if len(occupied) else []:
        labels = np.take(components, k, axis=slice_axis)
        air_here = np.take(inside, k, axis=slice_axis)
        candidates = np.unique(labels[air_here if previous is None else air_here & previous])
        candidates = candidates[thin[candidates]]
        if len(candidates) == 0:
            # A main bronchus can touch its lung over a slice or two before it leaves the
            # mediastinum: keep its last outline for up to `gap_mm` below.
            missed += 1
            if previous is None or missed * spacing[slice_axis] > gap_mm:
                break
            continue
        missed = 0
        airway_labels.append(candidates)
        previous = np.isin(labels, candidates)
    if not airway_labels:
        return np.zeros(inside.shape, dtype=bool)
    return np.isin(components, np.concatenate(airway_labels))


def _segment_lungmask(volume: CTVolume) -> LungMask:
    try:
        import SimpleITK as sitk
        from lungmask import LMInferer
    except ImportError as error:
        raise ValueError(
            "segmentation='lungmask' needs the lungmask package (pip install lungmask) with its "
            f"model weights on disk; it is not installed ({error})"
        ) from error
    from drasclr.data.io import lps_geometry_from_ras

    origin, spacing, direction = lps_geometry_from_ras(volume.affine)
    image = sitk.GetImageFromArray(volume.array.transpose(2, 1, 0))  # SimpleITK wants (z, y, x)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    labels = LMInferer().apply(image).transpose(2, 1, 0)  # lungmask: 1 right, 2 left
    return LungMask(labels.astype(np.uint8), volume.affine)
