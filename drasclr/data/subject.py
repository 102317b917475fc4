"""One subject from CT file to landmark patches (Yu et al. 2023, Sections 2.1, 3, 4.1).

read -> resample to 1 mm (cubic B-spline) -> lung segmentation -> density measures of the lungs
(``drasclr.data.density``) -> affine registration of the lung mask onto the atlas mask -> each
atlas landmark centre mapped into the subject (atlas world point -> subject world point ->
voxel index of the 1 mm volume) -> its 32^3 patch cut from the HU-windowed volume. Every
expected failure raises :class:`SubjectError` naming the source and the problem, so that a
pipeline can record it and go on with the other subjects. :func:`measure_density` runs only
the stages the density measures need, for stores made before they existed.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drasclr.data.density import density_measures
from drasclr.data.io import CTVolume, check_ct_intensities, check_geometry, read_ct
from drasclr.data.laterality import RIGHT_TO_LEFT, right_to_left_ratio
from drasclr.data.lung_segmentation import (
    LEFT, RIGHT, SEGMENTATION_METHODS, LungMask, segment_lungs,
)
from drasclr.data.patches import cut_patches
from drasclr.data.registration import FORWARD_FILE, INVERSE_FILE, SCHEDULES, register_to_atlas
from drasclr.data.resample import resample_isotropic
from drasclr.intensity import HU_WINDOW


class SubjectError(ValueError):
    """A subject that cannot be processed; the message names the source and the reason."""


@dataclass(frozen=True)
class ProcessedSubject:
    """The result of :func:`process_subject`.

    Attributes:
        patches: (L, P, P, P) int16 HU in the window [-1024, 240], one per atlas landmark.
        quality: figures for the manifest: ``dice`` (registration), the density measures
            (``drasclr.data.density.DENSITY_MEASURES``, lung volume included), and
            ``seconds_<stage>`` for read, resample, segment, density, register and cut.
        landmark_voxels: (L, 3) float landmark centres as voxel indices of the 1 mm volume.
        affine: (4, 4) voxel index -> RAS world mm of that 1 mm volume.
        lungs: the lung segmentation the registration used, on its own grid.
    """

    patches: np.ndarray
    quality: dict[str, float]
    landmark_voxels: np.ndarray
    affine: np.ndarray
    lungs: LungMask


def process_subject(
    source: str | Path | CTVolume,
    atlas,
    *,
    schedule: str = "fast",
    segmentation: str = "classical",
    transforms_dir: str | Path | None = None,
    min_dice: float = 0.8,
    lung_volume_ratio: tuple[float, float] = (0.2, 4.0),
) -> ProcessedSubject:
    """Turn one CT scan into its landmark patches.

    Args:
        source: a CT file or DICOM folder (see ``read_ct``), or an already read volume.
        atlas: a ``drasclr.data.atlas.Atlas`` (mask, affine, landmark centres, patch size).
        schedule: registration schedule, ``"fast"`` or ``"reference"``
            (docs/method.md#registration).
        segmentation: ``"classical"`` or ``"lungmask"``.
        transforms_dir: if given, the forward (``atlas_to_subject.mat``, ANTs' fwdtransform)
            and inverse (``subject_to_atlas.mat``) affine transforms are written there.
        min_dice: registrations whose lung Dice is below this are failures.
        lung_volume_ratio: plausible subject lung volume, as multiples of the atlas's.
    Raises:
        SubjectError: unreadable or implausible input, implausible lungs, poor registration.
        ValueError: an unknown ``schedule`` or ``segmentation`` (a caller's mistake, not the
            subject's).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
    if segmentation not in SEGMENTATION_METHODS:
        raise ValueError(f"segmentation: expected one of {SEGMENTATION_METHODS}, got {segmentation!r}")
    quality: dict[str, float] = {}
    with _subject_errors(source):
        volume, lungs = _segmented_volume(source, segmentation, quality)
        _check_lung_volume(lungs, atlas, lung_volume_ratio)
        quality[RIGHT_TO_LEFT] = right_to_left_ratio(lungs.labels, RIGHT, LEFT)
        with _timed(quality, "density"):
            quality.update(lung_density(volume, lungs))
        with _timed(quality, "register"):
            transform_files = None
            if transforms_dir is not None:
                folder = Path(transforms_dir)
                transform_files = (folder / FORWARD_FILE, folder / INVERSE_FILE)
            registration = register_to_atlas(
                lungs, LungMask(atlas.mask, atlas.affine), schedule, transform_files=transform_files
            )
            quality["dice"] = registration.dice
            if registration.dice < min_dice:
                raise ValueError(
                    f"registration failed: lung Dice {registration.dice:.3f} after registration "
                    f"is below {min_dice}"
                )
        with _timed(quality, "cut"):
            world = registration.map_points(atlas.centres_world())
            to_voxel = np.linalg.inv(volume.affine)
            landmark_voxels = world @ to_voxel[:3, :3].T + to_voxel[:3, 3]
            # Window the patches, not the whole volume: a fraction of the voxels.
            patches = cut_patches(volume.array, landmark_voxels, atlas.patch_size)
            patches = np.rint(np.clip(patches, *HU_WINDOW)).astype(np.int16)
    return ProcessedSubject(
        patches=patches, quality=quality, landmark_voxels=landmark_voxels, affine=volume.affine,
        lungs=lungs,
    )


def measure_density(source: str | Path | CTVolume, *, segmentation: str = "classical"
                    ) -> dict[str, float]:
    """The density measures of one scan without registering it or cutting patches: the same
    numbers as :func:`process_subject` records, plus ``seconds_density``.

    Runs read, resample, segment and measure only; ``drasclr preprocess`` uses it to add the
    measures to subjects of a store made before they existed.

    Raises:
        SubjectError: unreadable or implausible input, no lungs found.
    """
    if segmentation not in SEGMENTATION_METHODS:
        raise ValueError(f"segmentation: expected one of {SEGMENTATION_METHODS}, got {segmentation!r}")
    quality: dict[str, float] = {}
    with _subject_errors(source):
        volume, lungs = _segmented_volume(source, segmentation, quality)
        with _timed(quality, "density"):
            measures = lung_density(volume, lungs)
    return {**measures, "seconds_density": quality["seconds_density"]}


def lung_density(volume: CTVolume, lungs: LungMask) -> dict[str, float]:
    """The density measures (``drasclr.data.density``) of a 1 mm volume inside its lung mask,
    the segmentation's labels brought onto the volume's grid (nearest neighbour)."""
    lung = lungs.on_grid(volume.array.shape, volume.affine) > 0
    return density_measures(volume.array, lung, volume.affine)


def _segmented_volume(source: str | Path | CTVolume, segmentation: str,
                      quality: dict[str, float]) -> tuple[CTVolume, LungMask]:
    """The stages every use of a scan starts with: read (and check), resample to 1 mm, segment
    the lungs; each timed into ``quality``."""
    with _timed(quality, "read"):
        volume = source if isinstance(source, CTVolume) else read_ct(source)
        check_geometry(volume.affine, volume.source)  # a volume given in memory too
        check_ct_intensities(volume)
    with _timed(quality, "resample"):
        volume = resample_isotropic(volume, 1.0)
    with _timed(quality, "segment"):
        lungs = segment_lungs(volume, segmentation)
    return volume, lungs


@contextmanager
def _subject_errors(source: str | Path | CTVolume):
    """Turn the expected failures of a scan (ValueError, OSError) into a SubjectError whose
    message starts with the scan's name."""
    name = source.source if isinstance(source, CTVolume) else str(source)
    try:
        yield
    except SubjectError:
        raise
    except (ValueError, OSError) as error:
        message = str(error)
        raise SubjectError(message if message.startswith(name) else f"{name}: {message}") from error


def _check_lung_volume(lungs: LungMask, atlas, ratio: tuple[float, float]) -> None:
    atlas_ml = LungMask(atlas.mask, atlas.affine).volume_ml
    low, high = ratio[0] * atlas_ml, ratio[1] * atlas_ml
    if not low <= lungs.volume_ml <= high:
        raise ValueError(
            f"implausible lung volume {lungs.volume_ml:.0f} ml (expected {low:.0f}-{high:.0f} ml, "
            f"{ratio[0]}-{ratio[1]} times the atlas's {atlas_ml:.0f} ml): no lungs found, or not a chest CT"
        )


@contextmanager
def _timed(quality: dict[str, float], stage: str):
    """Record the stage's wall time as ``quality["seconds_<stage>"]``."""
    start = time.perf_counter()
    yield
    quality[f"seconds_{stage}"] = time.perf_counter() - start
