"""Affine registration of a subject's lung mask (moving) onto the atlas lung mask (fixed).

Yu et al. 2023, Sections 2.1 (eq. 1) and 3, with the authors' settings
(docs/method.md#registration): affine transform, mutual information, centre-of-mass initialisation,
the two lungs labelled 50 (right) and 100 (left) as in the authors' code. ``antsRegistration`` runs
with explicit arguments so that both schedules are exactly what they say:

- ``"reference"``: the authors' ``-t Affine[0.01] -m MI[fixed,moving,1,32,Regular,0.5]
  -c [500x250x100] -s 2x1x0 -f 4x2x1`` on the masks as given: the atlas on its own grid, the
  subject on the segmentation's 2 mm grid (minutes per scan);
- ``"fast"`` (default): the same metric on block-averaged masks (lung fractions, so edges stay
  smooth) coarse enough that the atlas lungs fill about 50,000 voxels (5 mm for an adult
  atlas), a two-level pyramid and fewer iterations; see benchmarks/RESULTS.md.

Both crop the images to the lungs and a margin of ``CROP_MARGIN`` voxels: the metric samples
the whole grid, and background far from the lungs only costs time (it also made the fast
schedule more accurate on the synthetic cohort).

ANTs' transform maps points of the FIXED space (atlas) to the MOVING space (subject): that is
the direction needed to carry atlas landmarks into a subject, and the opposite of the direction
in which it warps images. It is returned as a 4x4 matrix on RAS world mm
(``atlas_to_subject``), converted from ITK's LPS convention by ``drasclr.data.io`` helpers.
ITK's thread count comes from ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, read when ITK first runs
in a process; parallel pipelines set it to 1 per worker.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drasclr.atomic import atomic_path
from drasclr.data.io import LPS_FLIP, to_ants
from drasclr.data.lung_segmentation import LEFT, RIGHT, LungMask, block_mean

#: Label values of the right and left lung in the registered images (the reference's 50/100).
REFERENCE_LABELS = {RIGHT: 50.0, LEFT: 100.0}

#: Voxels of background kept around the lungs in the registered images.
CROP_MARGIN = 4


@dataclass(frozen=True)
class Schedule:
    """One antsRegistration affine stage.

    Attributes:
        lung_voxels: masks are block-averaged to voxels of about the size at which the atlas
            lungs fill this many voxels, but not finer than they are (None: used as given).
        gradient_step: ``Affine[step]``.
        iterations / shrink_factors / smoothing_sigmas: the pyramid, one entry per level
            (sigmas in voxels).
        sampling_rate: fraction of voxels sampled by the MI metric (regular grid, jittered).
    """

    lung_voxels: int | None
    gradient_step: float
    iterations: tuple[int, ...]
    shrink_factors: tuple[int, ...]
    smoothing_sigmas: tuple[float, ...]
    sampling_rate: float


SCHEDULES = {
    "reference": Schedule(None, 0.01, (500, 250, 100), (4, 2, 1), (2, 1, 0), 0.5),
    "fast": Schedule(50_000, 0.2, (100, 30), (2, 1), (1, 0), 0.1),
}


@dataclass(frozen=True)
class AffineRegistration:
    """Result of registering a subject to the atlas.

    Attributes:
        atlas_to_subject: (4, 4) maps atlas RAS world mm to subject RAS world mm.
        dice: Dice of the subject's lungs warped onto the atlas grid against the atlas lungs,
            on the registration grid.
    """

    atlas_to_subject: np.ndarray
    dice: float

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) atlas world points (RAS mm) -> (N, 3) subject world points."""
        points = np.asarray(points, dtype=np.float64)
        return points @ self.atlas_to_subject[:3, :3].T + self.atlas_to_subject[:3, 3]


def register_to_atlas(
    subject: LungMask,
    atlas: LungMask,
    schedule: str | Schedule = "fast",
    *,
    transform_files: tuple[Path, Path] | None = None,
    seed: int = 1,
) -> AffineRegistration:
    """Register a subject lung mask (moving) onto the atlas lung mask (fixed).

    Args:
        subject: the subject's lungs, e.g. from ``segment_lungs``.
        atlas: the atlas lungs (any two labels; see ``_registration_image``).
        schedule: ``"fast"``, ``"reference"`` or a :class:`Schedule`.
        transform_files: optional (forward, inverse) ``.mat`` paths; the forward file is ANTs'
            fwdtransform (atlas points -> subject), the inverse maps subject points to the atlas.
            Each is written atomically (temporary name in the same folder, then renamed).
        seed: antsRegistration's random seed (the metric's sampling jitter), for repeatability.
    """
    import ants

    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
        schedule = SCHEDULES[schedule]
    spacing = None
    if schedule.lung_voxels is not None:
        spacing = (LungMask(atlas.labels, atlas.affine).volume_ml * 1000.0 / schedule.lung_voxels) ** (1 / 3)
    fixed = _registration_image(atlas.labels, atlas.affine, spacing)
    moving = _registration_image(subject.labels, subject.affine, spacing)

    with tempfile.TemporaryDirectory(prefix="drasclr-reg-") as folder:
        fixed_path, moving_path = f"{folder}/fixed.nii.gz", f"{folder}/moving.nii.gz"
        ants.image_write(fixed, fixed_path)
        ants.image_write(moving, moving_path)
        prefix = f"{folder}/atlas_"
        arguments = [
            "--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
            "--output", prefix, "--random-seed", str(seed),
            "--initial-moving-transform", f"[{fixed_path},{moving_path},1]",
            "--transform", f"Affine[{schedule.gradient_step}]",
            "--metric", f"MI[{fixed_path},{moving_path},1,32,Regular,{schedule.sampling_rate}]",
            "--convergence", f"[{'x'.join(map(str, schedule.iterations))},1e-6,10]",
            "--shrink-factors", "x".join(map(str, schedule.shrink_factors)),
            "--smoothing-sigmas", "x".join(map(str, schedule.smoothing_sigmas)) + "vox",
        ]
        try:  # a list of arguments runs antsRegistration with exactly those
            ants.registration(fixed=arguments, moving=None)
        except RuntimeError as error:  # ITK failures, e.g. masks that do not overlap at all
            raise ValueError(f"registration failed: antsRegistration stopped ({error})") from error
        transform_path = prefix + "0GenericAffine.mat"
        transform = ants.read_transform(transform_path)
        dice = _warped_dice(fixed, moving, transform_path)
        if transform_files is not None:
            forward, inverse = (Path(p) for p in transform_files)
            _write_transform_atomically(transform, forward)
            _write_transform_atomically(transform.invert(), inverse)
    return AffineRegistration(atlas_to_subject=ras_matrix(transform), dice=dice)


#: File names of a subject's saved registration (``process_subject(transforms_dir=...)``).
FORWARD_FILE, INVERSE_FILE = "atlas_to_subject.mat", "subject_to_atlas.mat"


def load_subject_to_atlas(transforms_dir: str | Path) -> np.ndarray:
    """(4, 4) RAS matrix mapping a subject's world points into the atlas, from its saved
    registration folder (the store's ``transforms/<subject_id>/``).

    Raises:
        FileNotFoundError: no saved registration there (preprocess the subject first).
        ValueError: the file is not an affine ITK transform.
    """
    import ants

    path = Path(transforms_dir) / INVERSE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no saved registration for this subject (run `drasclr preprocess` on it)"
        )
    try:
        transform = ants.read_transform(str(path))
        matrix = ras_matrix(transform)
    except Exception as error:  # ITK read errors and odd parameter counts alike
        raise ValueError(f"{path}: not an affine transform file ({error})") from error
    return matrix


def ras_matrix(transform) -> np.ndarray:
    """An ANTs affine transform (LPS: y = A (x - c) + t + c) as a 4x4 matrix on RAS mm."""
    parameters = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:12]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre
    flip = np.eye(4)
    flip[:3, :3] = LPS_FLIP
    return flip @ lps @ flip


def _registration_image(mask: np.ndarray, affine: np.ndarray, spacing: float | None):
    """Any lung mask as the reference's label image: right lung 50, left lung 100.

    ``mask`` may hold any two lung labels (the atlas's 50/100, lungmask's 1/2, ...): the one
    whose voxels lie at larger RAS x is the right lung. A mask with any other number of labels
    is taken as one lung region and split at the sagittal plane through its centroid. Each lung
    is block-averaged to about ``spacing`` mm (lung fractions): a small, smooth label image.
    """
    factors = np.ones(3, dtype=int)
    if spacing is not None:
        factors = np.maximum(1, np.round(spacing / np.linalg.norm(affine[:3, :3], axis=0))).astype(int)
    # Lungs are large regions, so a 1-in-64 sample finds every label.
    values = np.unique(mask[::4, ::4, ::4])
    values = values[values != 0]
    if len(values) == 0:
        raise ValueError("lung mask is empty")
    fractions = []
    for value in values if len(values) == 2 else [None]:
        fraction, small_affine = block_mean(mask != 0 if value is None else mask == value, affine, factors)
        fractions.append(fraction)
    index = np.indices(fractions[0].shape, dtype=np.float32).reshape(3, -1)
    world_x = (small_affine[0, :3] @ index + small_affine[0, 3]).reshape(fractions[0].shape)
    if len(fractions) == 1:
        total = fractions[0]
        midline = float((world_x * total).sum() / total.sum())
        right, left = total * (world_x > midline), total * (world_x <= midline)
    else:
        centroid_x = [float((world_x * f).sum() / max(f.sum(), 1e-9)) for f in fractions]
        right, left = fractions if centroid_x[0] > centroid_x[1] else fractions[::-1]
    image = REFERENCE_LABELS[RIGHT] * right + REFERENCE_LABELS[LEFT] * left
    # The metric samples the whole grid: crop it to the lungs and a margin of background.
    lung_index = np.argwhere(image > 0)
    low = np.maximum(lung_index.min(axis=0) - CROP_MARGIN, 0)
    high = lung_index.max(axis=0) + CROP_MARGIN + 1
    cropped = image[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    shift = np.eye(4)
    shift[:3, 3] = low
    return to_ants(cropped, small_affine @ shift)


def _warped_dice(fixed, moving, transform_path: str) -> float:
    """Dice of the lungs (label image above half the smaller label) after warping moving."""
    import ants

    warped = ants.apply_transforms(fixed, moving, [transform_path], interpolator="linear")
    threshold = min(REFERENCE_LABELS.values()) / 2
    a, b = fixed.numpy() > threshold, warped.numpy() > threshold
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 0.0


def _write_transform_atomically(transform, path: Path) -> None:
    import ants

    # ITK picks the file format from the suffix, so the temporary name keeps ".mat".
    with atomic_path(path, ".mat") as temporary:
        ants.write_transform(transform, str(temporary))
