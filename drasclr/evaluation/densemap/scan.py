"""A scan made ready for a dense map: read, resampled to 1 mm, lungs found, registration loaded.

The map is computed on the 1 mm grid (the store's patches are cut at 1 mm); every voxel's
Loc-CondConv coordinate is its world point mapped into the atlas by the subject's saved
registration, then ``Atlas.coords_of_points``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from drasclr.data.atlas import Atlas
from drasclr.data.io import CTVolume, read_ct
from drasclr.intensity import HU_WINDOW


@dataclass
class PreparedScan:
    """A scan ready for mapping.

    Attributes:
        original: the scan as read (its grid is the output map's grid).
        iso: the scan resampled to 1 mm (the grid the maps are computed on).
        lung: (X, Y, Z) bool lung voxels of ``iso``.
        subject_to_atlas: (4, 4) RAS matrix, subject world mm -> atlas world mm.
        atlas: the atlas of the store (landmark coordinate convention).
        hu: ``iso`` windowed to int16 HU like the store's patches.
    """

    original: CTVolume
    iso: CTVolume
    lung: np.ndarray
    subject_to_atlas: np.ndarray
    atlas: Atlas
    hu: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lung.shape != self.iso.array.shape:
            raise ValueError(f"lung mask of shape {self.lung.shape} does not match the 1 mm "
                             f"scan of shape {self.iso.array.shape}")
        self.lung = self.lung.astype(bool, copy=False)
        self.hu = np.rint(np.clip(self.iso.array, *HU_WINDOW)).astype(np.int16)

    def coords_of_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices of ``iso`` -> (N, 3) float32 Loc-CondConv coordinates: the
        voxel's world point mapped into the atlas, then ``Atlas.coords_of_points``."""
        voxels = np.asarray(voxels, dtype=np.float64).reshape(-1, 3)
        world = voxels @ self.iso.affine[:3, :3].T + self.iso.affine[:3, 3]
        atlas_world = world @ self.subject_to_atlas[:3, :3].T + self.subject_to_atlas[:3, 3]
        return self.atlas.coords_of_points(atlas_world)


def store_atlas_and_transform(store: str | os.PathLike, subject_id: str
                              ) -> tuple[Atlas, np.ndarray]:
    """The store's atlas and the subject's saved subject-to-atlas matrix (clear errors)."""
    from drasclr.data.registration import load_subject_to_atlas
    from drasclr.data.store import PatchStore

    atlas = PatchStore(store).atlas()
    transforms = Path(store) / "transforms" / subject_id
    if not transforms.is_dir():
        raise FileNotFoundError(f"{transforms}: subject {subject_id!r} has no saved registration "
                                f"in the store {store} (run `drasclr preprocess` on its scan)")
    return atlas, load_subject_to_atlas(transforms)


def subject_of_image(store: str | os.PathLike, image: str | os.PathLike) -> str:
    """The subject id whose manifest ``source`` is ``image`` (same file), else the id
    preprocessing derives from the file name when the store has it."""
    from drasclr.data.preprocess import _subject_id_of
    from drasclr.data.store import PatchStore

    image = Path(image)
    manifest = PatchStore(store).manifest
    for row in manifest:
        with contextlib.suppress(OSError):
            if Path(row["source"]).exists() and os.path.samefile(row["source"], image):
                return row["subject_id"]
    guess = _subject_id_of(image)
    if any(row["subject_id"] == guess for row in manifest):
        return guess
    raise ValueError(f"{image}: no subject of the store {store} has this scan as its source; "
                     "give --subject")


def prepare_scan(image: str | os.PathLike | CTVolume, store: str | os.PathLike,
                 subject_id: str, lung_mask: str | os.PathLike | np.ndarray | None = None,
                 segmentation: str = "classical") -> PreparedScan:
    """Read, resample to 1 mm and find the lungs of a scan; load its saved registration.

    Args:
        image: the scan (any format ``read_ct`` reads) or a volume already read.
        store: the patch store that holds the subject's registration and names the atlas.
        subject_id: the subject's id in the store.
        lung_mask: a lung label file on the scan's grid (or an array on the 1 mm grid);
            default: ``segment_lungs`` as preprocessing does.
    """
    from drasclr.data.lung_segmentation import segment_lungs
    from drasclr.data.resample import resample_isotropic

    atlas, to_atlas = store_atlas_and_transform(store, subject_id)
    original = image if isinstance(image, CTVolume) else read_ct(image)
    iso = resample_isotropic(original, 1.0)
    if lung_mask is None:
        labels = segment_lungs(iso, segmentation)
        lung = labels_on_grid(labels.labels, labels.affine, iso)
    elif isinstance(lung_mask, np.ndarray):
        lung = lung_mask
    else:
        mask = read_ct(lung_mask)
        if mask.array.shape != original.array.shape or not np.allclose(mask.affine, original.affine,
                                                                       atol=1e-3):
            raise ValueError(f"{lung_mask}: lung mask grid differs from the scan's {original.source}")
        lung = labels_on_grid(mask.array, mask.affine, iso)
    return PreparedScan(original, iso, np.asarray(lung) > 0, to_atlas, atlas)


def labels_on_grid(labels: np.ndarray, affine: np.ndarray, target: CTVolume) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto ``target``'s grid."""
    matrix = np.linalg.inv(affine) @ target.affine  # target index -> label index
    return ndimage.affine_transform(np.asarray(labels, dtype=np.uint8), matrix[:3, :3],
                                    matrix[:3, 3], output_shape=target.array.shape, order=0,
                                    mode="constant", cval=0) > 0


