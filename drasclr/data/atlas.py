"""The landmark atlas: patch corners on an atlas lung mask, their coordinates and neighbours.

Yu et al. 2023, Sections 2.1 and 3, by the authors' grid rule (docs/method.md#atlas-and-landmarks):
scan the atlas lung mask with ``patch_size``^3 patches on a ``step`` grid and keep a patch when
more than ``min_lung_fraction`` of its voxels are lung; the reference raises that threshold by 0.1
until fewer than ``max_landmarks`` patches remain. A landmark is the patch's corner index (i, j, k)
in the mask array's own axis order; the network sees the normalised coordinate ``corner /
corner.max(axis=0) * 2 - 1`` (the reference convention, kept so that reference weights work as they
are). Neighbours are the nearest other landmarks by Euclidean distance between corners (the paper
uses k = 2); equidistant ones are ordered by index, or as the authors' unstable sort orders them
(``neighbour_ties``).

On the authors' atlas mask (387 x 387 x 319) this gives 575 landmarks. Their own landmark file
(``atlas_patch_loc.npy``, 581 landmarks) is imported with :func:`atlas_from_landmarks`; that is the
atlas to use with their weights (docs/method.md#the-authors-landmarks).

The atlas is saved as one ``.npz`` file (written atomically) holding the arrays and a JSON
metadata entry; ``drasclr atlas --mask M --out A.npz`` builds one from the command line.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.spatial.distance import cdist

from drasclr.atomic import atomic_write_bytes
from drasclr.data.introsort import classic_argsort
from drasclr.data.patches import PATCH_SIZE
from drasclr.file_format import check_header
from drasclr.ranges import AT_LEAST_ONE, Interval, check_number
from drasclr.deprecated_names import ATLAS_ARRAYS, renamed_keys

#: Identifies an atlas file written by :meth:`Atlas.save`; bumped when the layout changes.
ATLAS_FORMAT = "drasclr-atlas"
ATLAS_VERSION = 1

#: The reference raises the lung-fraction threshold by this much until few enough remain.
THRESHOLD_STEP = 0.1

#: How equidistant neighbours are ordered: by landmark index (a stable sort), or as the authors'
#: ``np.argsort`` of a row of scikit-learn's distance matrix orders them (numpy's default,
#: unstable sort: the order depends on the row's values, not on the indices).
NEIGHBOUR_TIES = ("index", "authors")


@dataclass
class Atlas:
    """Landmarks on an atlas lung mask (Yu et al. 2023, Section 3).

    Attributes:
        corners: (L, 3) int64 patch corners, voxel indices in the mask array's axis order.
        coords: (L, 3) float32 normalised coordinates ``corners / corners.max(0) * 2 - 1``.
        neighbours: (L, K) int64, for each landmark the K nearest other landmarks (distance
            between corners, nearest first, ties as ``neighbour_ties`` says). K is ``k_max``,
            or L - 1 when the atlas has fewer landmarks than that.
        mask: (X, Y, Z) uint8 lung labels of the atlas, 0 outside.
        affine: (4, 4) float64 voxel index -> RAS world mm (nibabel convention).
        patch_size: patch edge in voxels.
        step: grid step in voxels.
        min_lung_fraction: the lung-fraction threshold finally used (after raising); for
            imported landmarks, the smallest lung fraction of their patches on the mask.
        source: the mask file the atlas was built from.
        image_source: the atlas CT image given alongside the mask, if any.
        landmark_source: the landmark file the corners were imported from, or None when they
            come from the grid rule.
        neighbour_ties: how equidistant neighbours were ordered, one of ``NEIGHBOUR_TIES``.
    """

    corners: np.ndarray
    coords: np.ndarray
    neighbours: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    patch_size: int
    step: int
    min_lung_fraction: float
    source: str
    image_source: str | None = None
    landmark_source: str | None = None
    neighbour_ties: str = "index"

    @property
    def num_landmarks(self) -> int:
        return int(self.corners.shape[0])

    def neighbour_table(self, k: int) -> np.ndarray:
        """(L, k) indices of each landmark's k nearest other landmarks, nearest first."""
        available = self.neighbours.shape[1]
        if not 0 <= k <= available:
            raise ValueError(f"k: expected 0..{available} neighbours for this atlas, got {k}")
        return self.neighbours[:, :k]

    def centres_voxel(self) -> np.ndarray:
        """(L, 3) float64 patch centres in voxel indices: corner + (patch_size - 1) / 2."""
        return self.corners + (self.patch_size - 1) / 2.0

    def centres_world(self) -> np.ndarray:
        """(L, 3) float64 patch centres in RAS world mm (the atlas affine applied)."""
        return self.centres_voxel() @ self.affine[:3, :3].T + self.affine[:3, 3]

    def coords_of_points(self, points_world: np.ndarray) -> np.ndarray:
        """(N, 3) atlas world points (RAS mm) -> (N, 3) float32 Loc-CondConv coordinates.

        The coordinate of the patch centred at each point, in the landmarks' own convention:
        its corner (centre - (patch_size - 1) / 2, in atlas voxel indices) scaled by the
        landmarks' largest corner per axis. At a landmark's centre this is exactly that
        landmark's coordinate; any other point (voxel representations, Yu et al. 2023, eq. 10) gets
        the continuous coordinate between its neighbours'.
        """
        points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        to_voxel = np.linalg.inv(self.affine)
        corners = points @ to_voxel[:3, :3].T + to_voxel[:3, 3] - (self.patch_size - 1) / 2.0
        return scale_corners(corners, self.corners.max(axis=0))

    def save(self, path: str | Path) -> None:
        """Write the atlas to one ``.npz`` file, atomically (temp file, then rename)."""
        path = Path(path)
        metadata = {
            "format": ATLAS_FORMAT,
            "version": ATLAS_VERSION,
            "patch_size": self.patch_size,
            "step": self.step,
            "min_lung_fraction": self.min_lung_fraction,
            "source": self.source,
            "image_source": self.image_source,
            "landmark_source": self.landmark_source,
            "neighbour_ties": self.neighbour_ties,
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            metadata=np.array(json.dumps(metadata)),
            corners=self.corners,
            coords=self.coords,
            neighbours=self.neighbours,
            mask=self.mask,
            affine=self.affine,
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Atlas":
        """Read an atlas written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: naming the file: not a drasclr atlas (or of an unknown version),
                missing or unknown metadata keys, or arrays that disagree with each other or
                hold non-finite values (see :func:`check_atlas`).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no atlas file here (build one with `drasclr atlas`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                metadata = json.loads(str(data["metadata"]))
                stored = renamed_keys({name: data[name] for name in data.files}, ATLAS_ARRAYS,
                                      f"atlas file {path}")
                arrays = {name: stored[name]
                          for name in ("corners", "coords", "neighbours", "mask", "affine")}
        except Exception as error:  # zip, key and JSON errors all mean "not an atlas file"
            raise ValueError(f"{path}: not a drasclr atlas file ({error})") from error
        check_header(path, metadata, ATLAS_FORMAT, ATLAS_VERSION, "atlas file")
        missing = sorted(set(_METADATA_KEYS) - set(metadata))
        unknown = sorted(set(metadata) - set(_METADATA_KEYS) - set(_OPTIONAL_METADATA))
        if missing or unknown:
            raise ValueError(f"{path}: atlas metadata with missing key(s) {missing} and unknown "
                             f"key(s) {unknown}")
        try:
            atlas = cls(
                **arrays,
                patch_size=metadata["patch_size"],
                step=metadata["step"],
                min_lung_fraction=metadata["min_lung_fraction"],
                source=str(metadata["source"]),
                image_source=metadata["image_source"],
                **{key: metadata.get(key, default) for key, default in _OPTIONAL_METADATA.items()},
            )
            check_atlas(atlas)
        except ValueError as error:
            raise ValueError(f"{path}: inconsistent atlas file: {error}") from None
        return atlas


_METADATA_KEYS = ("format", "version", "patch_size", "step", "min_lung_fraction", "source",
                  "image_source")
#: Metadata that atlas files written before landmark import lack, and its value for them.
_OPTIONAL_METADATA = {"landmark_source": None, "neighbour_ties": "index"}


def check_atlas(atlas: Atlas) -> None:
    """Raise ValueError unless the atlas's arrays agree with each other: (L, 3) integer
    corners, their normalised coordinates (finite, as :func:`normalised_coords` gives them),
    (L, K) neighbour indices of other landmarks, a 3-D mask, a finite invertible affine and
    settings in range. Landmarks drive every patch and coordinate, so a damaged or hand-edited
    atlas is refused when loaded rather than cutting patches at the wrong places."""
    check_number("patch_size", atlas.patch_size, AT_LEAST_ONE)
    check_number("step", atlas.step, AT_LEAST_ONE)
    check_number("min_lung_fraction", atlas.min_lung_fraction, Interval(0, 1))  # raised up to 1
    if atlas.neighbour_ties not in NEIGHBOUR_TIES:
        raise ValueError(f"neighbour_ties: expected one of {NEIGHBOUR_TIES}, got "
                         f"{atlas.neighbour_ties!r}")
    corners, coords, neighbours = atlas.corners, atlas.coords, atlas.neighbours
    if (corners.ndim != 2 or corners.shape[1:] != (3,) or len(corners) == 0
            or not np.issubdtype(corners.dtype, np.integer)):
        raise ValueError(f"corners: expected (L, 3) integers with L >= 1, got {corners.dtype} "
                         f"{corners.shape}")
    if corners.min() < 0:
        raise ValueError("corners: negative voxel indices")
    if coords.shape != corners.shape or not np.issubdtype(coords.dtype, np.floating):
        raise ValueError(f"coords: expected floats of the corners' shape {corners.shape}, got "
                         f"{coords.dtype} {coords.shape}")
    if not np.isfinite(coords).all():
        raise ValueError(f"coords: {int((~np.isfinite(coords)).any(axis=1).sum())} landmark(s) "
                         "with NaN or infinite coordinates")
    if not np.allclose(coords, normalised_coords(corners), atol=1e-5):
        raise ValueError("coords do not match the corners (expected corners / corners.max(0) "
                         "* 2 - 1)")
    if (neighbours.ndim != 2 or len(neighbours) != len(corners)
            or not np.issubdtype(neighbours.dtype, np.integer)):
        raise ValueError(f"neighbours: expected ({len(corners)}, K) integers, got "
                         f"{neighbours.dtype} {neighbours.shape}")
    if neighbours.size and (neighbours.min() < 0 or neighbours.max() >= len(corners)
                           or (neighbours == np.arange(len(corners))[:, None]).any()):
        raise ValueError(f"neighbours: indices must name other landmarks in 0..{len(corners) - 1}")
    if atlas.mask.ndim != 3:
        raise ValueError(f"mask: expected a 3-D array, got shape {atlas.mask.shape}")
    affine = np.asarray(atlas.affine)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine: expected a finite (4, 4) matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 or not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError("affine: singular, or its last row is not (0, 0, 0, 1)")


def build_atlas(
    mask_path: str | Path,
    patch_size: int = PATCH_SIZE,
    step: int = 26,
    min_lung_fraction: float = 0.1,
    image_path: str | Path | None = None,
    max_landmarks: int = 1000,
    k_max: int = 8,
    neighbour_ties: str = "index",
) -> Atlas:
    """Build the landmark atlas from an atlas lung mask file (docs/method.md#atlas-and-landmarks).

    Args:
        mask_path: lung mask readable by nibabel; voxels > 0 are lung.
        patch_size: patch edge in voxels (32 in the paper).
        step: grid step in voxels (26 in the paper: 6 voxels of overlap).
        min_lung_fraction: keep patches whose lung fraction is above this.
        image_path: optional atlas CT image; it must share the mask's grid.
        max_landmarks: the threshold is raised by 0.1 until fewer landmarks than this remain.
        k_max: neighbours stored per landmark.
        neighbour_ties: order of equidistant neighbours, one of ``NEIGHBOUR_TIES``.

    Raises:
        ValueError: bad arguments, a mask that is not 3D or not integer labels 0..255, or no
            patch above the threshold.
    """
    for name, value in (("patch_size", patch_size), ("step", step), ("max_landmarks", max_landmarks)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    _check_neighbour_settings(k_max, neighbour_ties)
    if not 0.0 <= min_lung_fraction < 1.0:
        raise ValueError(f"min_lung_fraction: expected a value in [0, 1), got {min_lung_fraction!r}")

    labels, affine = _read_mask(Path(mask_path))
    if min(labels.shape) <= patch_size:
        raise ValueError(
            f"{mask_path}: mask of shape {labels.shape} is too small for {patch_size}^3 patches"
        )
    if image_path is not None:
        _check_same_grid(Path(image_path), labels.shape, affine)

    starts = [np.arange(0, size - patch_size, step) for size in labels.shape]
    lung_fraction = patch_lung_fractions(labels > 0, starts, patch_size)
    threshold = float(min_lung_fraction)
    while np.count_nonzero(lung_fraction > threshold) >= max_landmarks:
        threshold = round(threshold + THRESHOLD_STEP, 10)  # round: 0.1 steps stay exact
    kept = np.argwhere(lung_fraction > threshold)  # row-major: i, then j, then k
    if len(kept) == 0:
        raise ValueError(
            f"{mask_path}: no {patch_size}^3 patch has a lung fraction above {threshold}"
        )
    corners = np.stack([starts[axis][kept[:, axis]] for axis in range(3)], axis=1).astype(np.int64)
    return _atlas_of_corners(corners, labels, affine, k_max, neighbour_ties, patch_size=int(patch_size),
                             step=int(step), min_lung_fraction=threshold, source=str(mask_path),
                             image_source=None if image_path is None else str(image_path))


def atlas_from_landmarks(
    mask_path: str | Path,
    landmarks_path: str | Path,
    patch_size: int = PATCH_SIZE,
    image_path: str | Path | None = None,
    k_max: int = 8,
    neighbour_ties: str = "authors",
) -> Atlas:
    """The atlas of a landmark file written by the authors' atlas script
    (``atlas_patch_loc.npy``; docs/method.md#the-authors-landmarks), on its atlas lung mask.

    The file holds an (L, 3) integer array: each landmark's patch corner as an ITK index
    (x, y, z) of the atlas image, which is the NIfTI voxel index (i, j, k) that nibabel reads,
    so the corners are taken as they are, in the file's order (the landmark index is the row).
    Neighbours follow the authors' tie order by default, as their training did.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: naming the file: not an (L, 3) array of non-negative integers, or a patch
            reaching outside the mask.
    """
    _check_neighbour_settings(k_max, neighbour_ties)
    labels, affine = _read_mask(Path(mask_path))
    corners = read_landmark_file(landmarks_path)
    outside = np.flatnonzero((corners + patch_size > np.asarray(labels.shape)).any(axis=1))
    if len(outside):
        raise ValueError(f"{landmarks_path}: {len(outside)} landmark(s) (first: row {outside[0]}, "
                         f"corner {corners[outside[0]].tolist()}) put a {patch_size}^3 patch "
                         f"outside the mask of shape {labels.shape} ({mask_path})")
    if image_path is not None:
        _check_same_grid(Path(image_path), labels.shape, affine)
    lung = sliding_window_view(labels > 0, (patch_size,) * 3)[tuple(corners.T)]
    spread = np.gcd.reduce((corners - corners.min(axis=0)).ravel())
    return _atlas_of_corners(
        corners, labels, affine, k_max, neighbour_ties, patch_size=int(patch_size),
        step=int(spread) or 1,  # the grid step the corners lie on
        min_lung_fraction=float(lung.mean(axis=(1, 2, 3)).min()), source=str(mask_path),
        image_source=None if image_path is None else str(image_path),
        landmark_source=str(landmarks_path))


def _atlas_of_corners(corners: np.ndarray, labels: np.ndarray, affine: np.ndarray, k_max: int,
                      neighbour_ties: str, **settings) -> Atlas:
    """The atlas of these corners: their coordinates and neighbours computed, ``settings``
    the remaining fields."""
    neighbours = nearest_neighbours(corners, min(int(k_max), len(corners) - 1), neighbour_ties)
    return Atlas(corners=corners, coords=normalised_coords(corners), neighbours=neighbours,
                 mask=labels, affine=affine, neighbour_ties=neighbour_ties, **settings)


def read_landmark_file(path: str | Path) -> np.ndarray:
    """(L, 3) int64 corners of an authors' landmark file (``np.save`` of an (L, 3) array)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such landmark file")
    try:
        corners = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises several types for a file that is not .npy
        raise ValueError(f"{path}: not a numpy landmark file ({error})") from error
    if (corners.ndim != 2 or corners.shape[1] != 3 or len(corners) < 2
            or not np.issubdtype(corners.dtype, np.number)):
        raise ValueError(f"{path}: expected an (L, 3) array of patch corners with L >= 2, got "
                         f"{corners.dtype} {corners.shape}")
    if not np.isfinite(corners).all() or np.any(corners % 1) or corners.min() < 0:
        raise ValueError(f"{path}: patch corners must be non-negative integer voxel indices")
    if len(np.unique(corners, axis=0)) != len(corners):
        raise ValueError(f"{path}: the same corner is listed more than once")
    return corners.astype(np.int64)


def _check_neighbour_settings(k_max: int, neighbour_ties: str) -> None:
    if int(k_max) != k_max or k_max < 0:
        raise ValueError(f"k_max: expected a non-negative integer, got {k_max!r}")
    if neighbour_ties not in NEIGHBOUR_TIES:
        raise ValueError(f"neighbour_ties: expected one of {NEIGHBOUR_TIES}, got "
                         f"{neighbour_ties!r}")


def patch_lung_fractions(lung: np.ndarray, starts: list[np.ndarray], patch_size: int) -> np.ndarray:
    """Lung fraction of every patch on the grid ``starts[0] x starts[1] x starts[2]``.

    Box sums are separable: summing one axis over the windows shrinks it to the grid before
    the next axis is summed, so only the first pass reads the full volume. That pass runs
    along the axis of largest stride, where each window edge cuts the volume into contiguous
    slabs.
    """
    sums = lung
    for axis in np.argsort(lung.strides)[::-1]:
        sums = _window_sums(sums, starts[axis], patch_size, int(axis))
    return sums / float(patch_size**3)


def _window_sums(values: np.ndarray, starts: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Sums of ``values`` over ``[s, s + size)`` along ``axis`` for every start s."""
    edges = np.unique(np.concatenate([[0], starts, starts + size]))
    moved = np.moveaxis(values, axis, 0)
    between_edges = [moved[lo:hi].sum(axis=0, dtype=np.int64) for lo, hi in zip(edges[:-1], edges[1:])]
    prefix = np.cumsum([np.zeros_like(between_edges[0])] + between_edges, axis=0)  # sums before edges
    window = prefix[np.searchsorted(edges, starts + size)] - prefix[np.searchsorted(edges, starts)]
    return np.moveaxis(window, 0, axis)


def normalised_coords(corners: np.ndarray) -> np.ndarray:
    """``corners / corners.max(0) * 2 - 1`` as float32 (the authors' convention,
    docs/method.md#atlas-and-landmarks).

    An axis whose maximum corner is 0 (a single grid position) maps to -1 instead of 0/0.
    """
    return scale_corners(corners, corners.max(axis=0))


def scale_corners(corners: np.ndarray, axis_max: np.ndarray) -> np.ndarray:
    """``corners / axis_max * 2 - 1`` as float32; an axis whose maximum is 0 maps to -1."""
    axis_max = np.asarray(axis_max, dtype=np.float64)
    scaled = np.asarray(corners, dtype=np.float64) / np.where(axis_max > 0, axis_max, 1.0)
    return (scaled * 2.0 - 1.0).astype(np.float32)


def nearest_neighbours(corners: np.ndarray, k: int, ties: str = "index") -> np.ndarray:
    """(L, k) int64: each landmark's k nearest other landmarks, nearest first.

    ``ties="index"`` orders equidistant landmarks by index. ``ties="authors"`` repeats the
    authors' dataset code: each row of scikit-learn's Euclidean distance matrix sorted by
    numpy's default argsort, its first entry (the landmark itself, at distance 0) dropped.
    Grid corners have many exact ties (six face neighbours at one step), which that unstable
    sort breaks by where they sit in the row, not by index; the classic form of the sort
    (:func:`drasclr.data.introsort.classic_argsort`) gives the same neighbours on every machine.
    """
    if ties == "authors":
        from sklearn.metrics import pairwise_distances

        distance = pairwise_distances(np.asarray(corners, dtype=np.float64), metric="euclidean")
        return np.stack([classic_argsort(row)[1 : k + 1] for row in distance]).astype(np.int64)
    distance = cdist(corners, corners)
    np.fill_diagonal(distance, np.inf)
    return np.argsort(distance, axis=1, kind="stable")[:, :k].astype(np.int64)


def _read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 labels, affine) of a 3D lung mask; errors name the file and the problem."""
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mask file")
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
    except Exception as error:  # nibabel/gzip raise many types for a damaged file
        raise ValueError(f"{path}: unreadable mask file ({error})") from error
    array = array.reshape(array.shape[:3]) if array.ndim > 3 and set(array.shape[3:]) == {1} else array
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D lung mask, got shape {array.shape}")
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.all(np.isfinite(array)) and not np.any(array % 1)
    )
    if not integral or array.min() < 0 or array.max() > 255:
        raise ValueError(f"{path}: expected integer lung labels in 0..255 (0 outside the lungs)")
    if not np.any(array):
        raise ValueError(f"{path}: the mask holds no lung voxels")
    return array.astype(np.uint8), np.asarray(image.affine, dtype=np.float64)


def _check_same_grid(image_path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    import nibabel as nib

    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: no such atlas image file")
    try:
        header = nib.load(str(image_path))
    except Exception as error:
        raise ValueError(f"{image_path}: unreadable atlas image ({error})") from error
    if header.shape[:3] != shape or not np.allclose(header.affine, affine, atol=1e-3):
        raise ValueError(
            f"{image_path}: atlas image grid {header.shape[:3]} does not match the mask's {shape} "
            "(shape and affine must agree)"
        )
