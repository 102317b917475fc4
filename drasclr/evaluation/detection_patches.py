"""Detection patches: the 32^3 patch and the atlas coordinate of every annotated point.

The emphysema subtype detection of Yu et al. 2023 (Table 5) classifies 32 mm boxes centred on
annotated points. Here each point of an annotation CSV (``subject_id, x_mm, y_mm, z_mm,
label``, subject world RAS mm; the synthetic cohort's ``annotations.csv`` is one) becomes:

- its 32^3 patch at 1 mm, cut from the subject's scan resampled as in preprocessing and
  windowed to int16 HU exactly like the store's landmark patches (``drasclr.data.subject``);
- its Loc-CondConv coordinate: the point mapped into the atlas through the subject's saved
  registration (``store/transforms/<id>/``), then ``Atlas.coords_of_points``. Loc-CondConv
  takes a continuous coordinate, so any point works, not only landmarks.

For the paper's detection rule (a box is detected when >= 25 % of its voxels have p > 0.5,
Section 4.3.1) every point also keeps its 32 mm box: the HU of the region that the 32^3
patches centred on the box's voxels cover (63^3 voxels), the box's lung voxels (the lung
segmentation resampled to 1 mm, as ``drasclr densemap`` does) and the affine map from box
voxel index to Loc-CondConv coordinate (:mod:`drasclr.evaluation.detection_voxels` uses them).

The scan of a subject is read and resampled once for all its points. The result is cached in
one ``.npz`` (written atomically) keyed by a hash of the annotation file, the store's manifest
and ``store.json``, so repeated experiments never re-read scans and a changed annotation file
or re-run preprocessing is picked up.

Lung check: the lungs are segmented on the resampled scan with the method preprocessing uses
(``segment_lungs``, classical by default) and a point must lie within ``lung_tolerance_mm``
(default 5 mm) of a lung voxel. The tolerance is there because the segmentation works on 2 mm
blocks and its edge can miss subpleural (paraseptal) lesions; a point in the body wall or in
the air around the patient is still refused. ``lung_tolerance_mm=None`` skips the check.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from drasclr.atomic import atomic_write_bytes
from drasclr.data.atlas import Atlas
from drasclr.data.io import read_ct
from drasclr.data.lung_segmentation import LungMask, segment_lungs
from drasclr.data.patches import PATCH_SIZE, cut_patches
from drasclr.data.registration import load_subject_to_atlas
from drasclr.data.resample import resample_isotropic
from drasclr.data.store import DONE, PatchStore, atlas_checksum, read_store_config
from drasclr.evaluation.densemap.scan import labels_on_grid
from drasclr.evaluation.densemap.window import HALF
from drasclr.intensity import HU_WINDOW

#: Labels an annotation may carry; the detection tasks are each subtype against healthy.
LABELS = ("centrilobular", "paraseptal", "healthy")
REQUIRED_COLUMNS = ("subject_id", "x_mm", "y_mm", "z_mm", "label")
#: Bumped whenever the cached content changes meaning, so old caches are not reused.
CACHE_VERSION = 2
CACHE_FORMAT = "drasclr-detection-patches"
#: A box is the 32^3 patch of its point; the 32^3 patches centred on its voxels span 63^3.
BOX = PATCH_SIZE
REGION = 2 * PATCH_SIZE - 1
ARRAYS = ("subject_ids", "labels", "points_mm", "atlas_points_mm", "coords", "patches",
          "regions", "box_lung", "box_coord_affine")


@dataclass
class Annotations:
    """Annotated points read from a CSV: row n of the arrays is line ``lines[n]`` of ``path``."""

    path: Path
    subject_ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) str
    points_mm: np.ndarray  # (N, 3) float64, subject world RAS mm
    lines: np.ndarray  # (N,) int, 1-based line numbers (the header is line 1)

    def where(self, row: int) -> str:
        return f"{self.path}, line {int(self.lines[row])}"


@dataclass
class DetectionPatches:
    """The patches and atlas coordinates of annotated points (Yu et al. 2023, Table 5 data).

    Attributes:
        subject_ids, labels: (N,) str, per point.
        points_mm: (N, 3) subject world points (RAS mm).
        atlas_points_mm: (N, 3) the same points in the atlas (RAS mm), via the registration.
        coords: (N, 3) float32 Loc-CondConv coordinates of the points.
        patches: (N, 32, 32, 32) int16 HU in the window [-1024, 240]; the network input is
            ``drasclr.intensity.normalise_hu(patches)``. The box of a point is its patch.
        regions: (N, 63, 63, 63) int16 HU like ``patches``: region voxel r is box voxel
            r - 16, so the patch centred on box voxel b is ``regions[n, b:b+32, ...]`` and
            ``patches[n] == regions[n, 16:48, 16:48, 16:48]``; None when not made.
        box_lung: (N, 32, 32, 32) bool, the box's lung voxels; None when not made.
        box_coord_affine: (N, 4, 3) float64: box voxel b's coordinate is ``[*b, 1] @ A[n]``;
            None when not made.
        metadata: annotation file, store, cache key.
    """

    subject_ids: np.ndarray
    labels: np.ndarray
    points_mm: np.ndarray
    atlas_points_mm: np.ndarray
    coords: np.ndarray
    patches: np.ndarray
    regions: Optional[np.ndarray] = None
    box_lung: Optional[np.ndarray] = None
    box_coord_affine: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_boxes(self) -> bool:
        """Whether the box arrays (regions, lung, coordinates) are there."""
        return not any(a is None for a in (self.regions, self.box_lung, self.box_coord_affine))

    def subset(self, rows: np.ndarray) -> "DetectionPatches":
        """The points ``rows`` (indices or a bool mask), metadata shared."""
        arrays = {name: None if value is None else value[rows]
                  for name, value in vars(self).items() if name != "metadata"}
        return DetectionPatches(**arrays, metadata=dict(self.metadata))

    def save(self, path: str | Path) -> Path:
        """Write one uncompressed ``.npz`` atomically (uncompressed: loading is the hot path)."""
        header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **self.metadata}
        buffer = io.BytesIO()
        if not self.has_boxes:
            raise ValueError("a detection patch cache holds the boxes: regions, box_lung and "
                             "box_coord_affine are needed")
        np.savez(buffer, metadata=np.array(json.dumps(header)),
                 subject_ids=self.subject_ids.astype(str), labels=self.labels.astype(str),
                 **{name: getattr(self, name) for name in ARRAYS[2:]})
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "DetectionPatches":
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["metadata"]))
            if header.get("format") != CACHE_FORMAT or header.get("version") != CACHE_VERSION:
                raise ValueError(f"{path}: not a detection patch cache of version {CACHE_VERSION}")
            arrays = {name: data[name] for name in ARRAYS}
        metadata = {k: v for k, v in header.items() if k not in ("format", "version")}
        return cls(**arrays, metadata=metadata)


def read_annotations(path: str | Path) -> Annotations:
    """Read and check an annotation CSV (columns ``subject_id, x_mm, y_mm, z_mm, label``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing columns, no rows, a non-numeric coordinate or an unknown label,
            naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(REQUIRED_COLUMNS)})")
        ids, labels, points, lines = [], [], [], []
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            label = (row["label"] or "").strip()
            if label not in LABELS:
                raise ValueError(f"{where}: unknown label {label!r} (expected one of "
                                 f"{', '.join(LABELS)})")
            try:
                point = [float(row[c]) for c in ("x_mm", "y_mm", "z_mm")]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: x_mm, y_mm, z_mm must be numbers, got "
                                 f"{[row[c] for c in ('x_mm', 'y_mm', 'z_mm')]}") from None
            if not np.all(np.isfinite(point)):
                raise ValueError(f"{where}: non-finite coordinate {point}")
            ids.append((row["subject_id"] or "").strip())
            labels.append(label)
            points.append(point)
            lines.append(reader.line_num)
    if not ids:
        raise ValueError(f"{path}: no annotated points")
    return Annotations(path, np.array(ids, dtype=str), np.array(labels, dtype=str),
                       np.array(points, dtype=np.float64).reshape(-1, 3), np.array(lines))


def cache_key(annotations_path: str | Path, store_root: str | Path,
              lung_tolerance_mm: float | None, segmentation: str) -> str:
    """SHA-256 of everything the patches depend on: the annotation file, the store's manifest
    and store.json (a re-run preprocessing rewrites the manifest), and the check's settings."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}/{CACHE_VERSION}/{lung_tolerance_mm}/"
                            f"{segmentation}".encode())
    for path in (Path(annotations_path), Path(store_root) / "manifest.csv",
                 Path(store_root) / "store.json"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def detection_patches(
    annotations: str | Path,
    store: str | Path,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    atlas: Atlas | None = None,
    lung_tolerance_mm: float | None = 5.0,
    segmentation: str = "classical",
    progress: bool = False,
) -> DetectionPatches:
    """The patches and atlas coordinates of every point of ``annotations`` (cached).

    Args:
        annotations: a CSV with ``subject_id, x_mm, y_mm, z_mm, label`` (subject world mm).
        store: a patch store made by ``drasclr preprocess`` from these subjects' scans.
        cache_dir: where the cache file goes (default ``<store>/detection_cache``).
        use_cache: False recomputes and writes nothing.
        atlas: the store's atlas (default: read from the path in ``store.json``).
        lung_tolerance_mm: how far from the segmented lung a point may lie; None: no check.
        segmentation: the lung segmentation method for that check.
        progress: a progress bar over subjects.

    Raises:
        FileNotFoundError / ValueError: a bad annotation file (see ``read_annotations``); a
            subject not in the store, failed in preprocessing or without a saved registration;
            a point outside its scan or away from the lungs. Messages name file and line.
    """
    store = Path(store)
    read_store_config(store)  # a clear error when it is not a store
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"{annotations}: no such annotation file")
    cache_path = None
    if use_cache:
        key = cache_key(annotations, store, lung_tolerance_mm, segmentation)
        folder = Path(cache_dir) if cache_dir is not None else store / "detection_cache"
        cache_path = folder / f"{Path(annotations).stem}-{key[:20]}.npz"
        if cache_path.is_file():
            try:
                return DetectionPatches.load(cache_path)
            except (OSError, ValueError, KeyError):
                pass  # damaged or foreign: recompute and replace it
    result = compute_detection_patches(read_annotations(annotations), store, atlas=atlas,
                                       lung_tolerance_mm=lung_tolerance_mm,
                                       segmentation=segmentation, progress=progress)
    if cache_path is not None:
        result.metadata["cache_key"] = cache_path.stem
        try:
            result.save(cache_path)
        except PermissionError as error:  # a read-only store still works, only slower
            warnings.warn(f"{cache_path.parent}: cannot write the detection patch cache "
                          f"({error.strerror}); give cache_dir / --cache-dir", stacklevel=2)
            return result
        # Older caches of this annotation file are stale (it or the store changed): drop them.
        same_file = re.compile(re.escape(Path(annotations).stem) + r"-[0-9a-f]{20}\.npz")
        for stale in cache_path.parent.iterdir():
            if stale != cache_path and same_file.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
    return result


def compute_detection_patches(
    annotations: Annotations,
    store: str | Path,
    *,
    atlas: Atlas | None = None,
    lung_tolerance_mm: float | None = 5.0,
    segmentation: str = "classical",
    progress: bool = False,
) -> DetectionPatches:
    """:func:`detection_patches` without the cache: reads each subject's scan once."""
    from tqdm import tqdm

    store = Path(store)
    if atlas is None:
        atlas = PatchStore(store).atlas()
    elif atlas_checksum(atlas) != read_store_config(store)["atlas_checksum"]:
        raise ValueError(f"{store}: the store was made for another atlas than the one given")
    sources = _subject_sources(annotations, store)
    # Registrations first: they are cheap, so a missing one fails before any scan is read.
    to_atlas = {}
    for subject_id in sources:
        try:
            to_atlas[subject_id] = load_subject_to_atlas(store / "transforms" / subject_id)
        except (FileNotFoundError, ValueError) as error:
            first = int(np.flatnonzero(annotations.subject_ids == subject_id)[0])
            raise type(error)(f"{annotations.where(first)}: subject {subject_id!r}: "
                              f"{error}") from None

    n, size = len(annotations.labels), atlas.patch_size
    if size != BOX:
        raise ValueError(f"{store}: the atlas's patches are {size}^3; detection boxes are "
                         f"{BOX}^3 (32 mm at 1 mm)")
    regions = np.empty((n, REGION, REGION, REGION), dtype=np.int16)
    box_lung = np.empty((n, BOX, BOX, BOX), dtype=bool)
    box_coord_affine = np.empty((n, 4, 3), dtype=np.float64)
    atlas_points = np.empty((n, 3), dtype=np.float64)
    for subject_id in tqdm(sorted(sources), desc="detection patches", unit="subject",
                           disable=not progress):
        rows = np.flatnonzero(annotations.subject_ids == subject_id)
        points = annotations.points_mm[rows]
        try:
            volume = resample_isotropic(read_ct(sources[subject_id]), 1.0)
        except (OSError, ValueError) as error:
            first = annotations.where(int(rows[0]))
            raise type(error)(f"{first}: subject {subject_id!r}: cannot read its scan "
                              f"({error})") from None
        to_voxel = np.linalg.inv(volume.affine)
        voxels = points @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        _check_inside_scan(annotations, rows, voxels, volume.array.shape, sources[subject_id])
        lungs = segment_lungs(volume, segmentation)
        if lung_tolerance_mm is not None:
            _check_in_lung(annotations, rows, lungs, lung_tolerance_mm, sources[subject_id])
        # The box of a point is its patch, corner round(v - 15.5) (``cut_patches``); its region
        # starts 16 voxels before. Outside the scan: air, as the reference pads its volumes.
        corners = np.rint(voxels - (BOX - 1) / 2.0)
        cut = cut_patches(volume.array, corners + (REGION - 1) / 2.0 - HALF, REGION)
        regions[rows] = np.rint(np.clip(cut, *HU_WINDOW)).astype(np.int16)
        lung = labels_on_grid(lungs.labels, lungs.affine, volume).astype(np.uint8)
        box_lung[rows] = cut_patches(lung, corners + (BOX - 1) / 2.0, BOX, fill=0) > 0
        matrix = to_atlas[subject_id]
        atlas_points[rows] = points @ matrix[:3, :3].T + matrix[:3, 3]
        box_coord_affine[rows] = _box_coord_affines(corners, volume.affine, matrix, atlas)
    return DetectionPatches(
        subject_ids=annotations.subject_ids, labels=annotations.labels,
        points_mm=annotations.points_mm, atlas_points_mm=atlas_points,
        coords=atlas.coords_of_points(atlas_points),
        patches=np.ascontiguousarray(regions[:, HALF:HALF + BOX, HALF:HALF + BOX, HALF:HALF + BOX]),
        regions=regions, box_lung=box_lung, box_coord_affine=box_coord_affine,
        metadata={"annotations": str(annotations.path), "store": str(store),
                  "atlas": read_store_config(store)["atlas"],
                  "lung_tolerance_mm": lung_tolerance_mm, "segmentation": segmentation},
    )


def _box_coord_affines(corners: np.ndarray, iso_affine: np.ndarray, to_atlas: np.ndarray,
                       atlas: Atlas) -> np.ndarray:
    """(N, 4, 3): box voxel b of box n (1 mm voxel ``corners[n] + b``) has the Loc-CondConv
    coordinate ``[*b, 1] @ A[n]`` (the voxel's world point through the registration, then
    ``Atlas.coords_of_points``; all affine, so four points fix it)."""
    basis = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    voxels = (corners[:, None, :] + basis[None]).reshape(-1, 3)
    world = voxels @ iso_affine[:3, :3].T + iso_affine[:3, 3]
    coords = atlas.coords_of_points(world @ to_atlas[:3, :3].T + to_atlas[:3, 3])
    coords = coords.astype(np.float64).reshape(len(corners), 4, 3)
    return np.concatenate([coords[:, 1:] - coords[:, :1], coords[:, :1]], axis=1)


def _subject_sources(annotations: Annotations, store: Path) -> dict[str, str]:
    """Scan path of every annotated subject, from the manifest; errors name the first line."""
    manifest = {row["subject_id"]: row for row in PatchStore(store).manifest}
    sources = {}
    for subject_id in dict.fromkeys(annotations.subject_ids.tolist()):
        row_index = int(np.flatnonzero(annotations.subject_ids == subject_id)[0])
        where = annotations.where(row_index)
        row = manifest.get(subject_id)
        if row is None:
            raise ValueError(f"{where}: subject {subject_id!r} is not in the patch store {store} "
                             "(preprocess its scan into this store first)")
        if row["status"] != DONE:
            raise ValueError(f"{where}: subject {subject_id!r} failed preprocessing in {store} "
                             f"({row.get('error') or 'no reason recorded'})")
        sources[subject_id] = row["source"]
    return sources


def _check_inside_scan(annotations: Annotations, rows: np.ndarray, voxels: np.ndarray,
                       shape: tuple[int, ...], source: str) -> None:
    outside = np.any((voxels < -0.5) | (voxels > np.asarray(shape) - 0.5), axis=1)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        point = np.round(annotations.points_mm[rows[first]], 1).tolist()
        raise ValueError(f"{annotations.where(rows[first])}: point {point} mm of subject "
                         f"{annotations.subject_ids[rows[first]]} lies outside its scan {source} "
                         f"(voxel {np.round(voxels[first], 1).tolist()} of a 1 mm grid of shape "
                         f"{tuple(shape)})")


def _check_in_lung(annotations: Annotations, rows: np.ndarray, lungs: LungMask,
                   tolerance_mm: float, source: str) -> None:
    """Every point within ``tolerance_mm`` of a lung voxel of ``lungs`` (on its own grid: the
    classical segmentation returns 2 mm labels)."""
    points = annotations.points_mm[rows]
    to_voxel = np.linalg.inv(lungs.affine)
    voxels = points @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    spacing = np.linalg.norm(lungs.affine[:3, :3], axis=0)
    reach = np.ceil(tolerance_mm / spacing).astype(int) + 1
    for n, voxel in enumerate(voxels):
        centre = np.rint(voxel).astype(int)
        low = np.clip(centre - reach, 0, lungs.labels.shape)
        high = np.clip(centre + reach + 1, 0, lungs.labels.shape)
        box = lungs.labels[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        # Distance to the nearest lung voxel taken as a box, not its centre: a point anywhere
        # inside a lung voxel is at 0 mm.
        gap = np.maximum(np.abs(np.argwhere(box) + low - voxel) - 0.5, 0.0) * spacing
        distance = np.min(np.linalg.norm(gap, axis=1)) if len(gap) else np.inf
        if distance > tolerance_mm:
            row = rows[n]
            how_far = f"{distance:.1f} mm" if np.isfinite(distance) else "far"
            raise ValueError(f"{annotations.where(row)}: point {np.round(points[n], 1).tolist()} "
                             f"mm of subject {annotations.subject_ids[row]} is {how_far} from the "
                             f"lungs segmented in {source} (allowed: {tolerance_mm:g} mm); not a "
                             "lung point")
