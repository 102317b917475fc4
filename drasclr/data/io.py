"""Reading CT volumes from NIfTI, anything ANTs/ITK reads (NRRD, MHA, MHD, ...), and DICOM series.

Every reader returns a :class:`CTVolume`: the voxels in the file's own order, in Hounsfield
units, and a nibabel-style affine mapping voxel indices to RAS world millimetres. ITK/ANTs and
DICOM describe geometry in LPS (x and y negated); the two conversions between the conventions
live here and nowhere else (:func:`ras_affine_from_lps`, :func:`lps_geometry_from_ras`), so the
same physical volume read from any format has the same world geometry.

Readers raise ``ValueError`` naming the path and the problem (missing, unreadable or truncated,
not 3D, no slices, degenerate geometry); the per-subject pipeline turns these into
``SubjectError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: RAS <-> LPS: negate world x and y (the map is its own inverse).
LPS_FLIP = np.diag([-1.0, -1.0, 1.0])

#: Suffixes read with nibabel; everything else that is a file goes through ANTs (ITK).
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Smallest |det| of the direction cosines (unit columns) a usable grid has: 1 for any rotation
#: or flip, about sin(angle) when two axes are nearly parallel. Below it resampling and
#: registration would divide by almost zero.
MIN_DIRECTION_DETERMINANT = 0.1


@dataclass(frozen=True)
class CTVolume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        array: (X, Y, Z) float32 HU, in the file's voxel order.
        affine: (4, 4) voxel index -> RAS world mm (nibabel convention).
        source: where the volume came from, for error messages and the manifest.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def ras_affine_from_lps(origin, spacing, direction) -> np.ndarray:
    """ITK/ANTs geometry (LPS origin, spacing, direction cosines as columns) -> RAS affine."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_FLIP @ np.asarray(direction, float) @ np.diag(np.asarray(spacing, float))
    affine[:3, 3] = LPS_FLIP @ np.asarray(origin, float)
    return affine


def lps_geometry_from_ras(affine: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """RAS affine -> ITK/ANTs (origin, spacing, direction) in LPS; inverse of the above."""
    linear = LPS_FLIP @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = LPS_FLIP @ np.asarray(affine, float)[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), direction


def to_ants(array: np.ndarray, affine: np.ndarray):
    """A numpy volume with a RAS affine as an ANTsImage (float32) with the same world geometry."""
    import ants

    origin, spacing, direction = lps_geometry_from_ras(affine)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32), origin=origin, spacing=spacing,
        direction=direction,
    )


def read_ct(path: str | Path) -> CTVolume:
    """Read a CT volume: a NIfTI file, any file ITK reads (NRRD, MHA, ...), or a DICOM folder.

    Raises:
        ValueError: the path is missing, unreadable or truncated, or does not hold a 3D volume.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        volume = _read_dicom_series(path)
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        volume = _read_nifti(path)
    else:
        volume = _read_with_ants(path)
    check_geometry(volume.affine, volume.source)
    return volume


def check_geometry(affine: np.ndarray, source: str, spacing=None) -> None:
    """Raise ValueError naming ``source`` and the problem when a volume's geometry is
    degenerate: a non-finite affine, zero, negative or non-finite voxel spacing (``spacing``:
    the header's own values where the format stores them apart from the directions), or
    direction cosines that are singular or nearly so (two axes almost parallel)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{source}: degenerate geometry: the voxel-to-world affine is not a "
                         "finite 4 x 4 matrix")
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64)
        if not np.isfinite(spacing).all() or (spacing <= 0).any():
            raise ValueError(f"{source}: degenerate geometry: voxel spacing {spacing.tolist()} mm "
                             "(each must be a finite positive number)")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if (norms <= 1e-6).any():
        axes = [int(a) for a in np.flatnonzero(norms <= 1e-6)]
        raise ValueError(f"{source}: degenerate geometry: zero voxel spacing along array "
                         f"axis {axes} (spacing {np.round(norms, 6).tolist()} mm)")
    determinant = abs(np.linalg.det(affine[:3, :3] / norms))
    if determinant < MIN_DIRECTION_DETERMINANT:
        raise ValueError(f"{source}: degenerate geometry: the direction cosines are singular or "
                         f"nearly so (|det| {determinant:.3g} < {MIN_DIRECTION_DETERMINANT}: two "
                         "array axes point almost the same way in the world)")


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes (e.g. a 4D file with one time point); demand 3 axes."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"{path}: expected a 3D volume, got an image of shape {array.shape}")
    return array


def _read_nifti(path: Path) -> CTVolume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        # Reading the proxy applies scl_slope/scl_inter; decompressing here detects truncation.
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel/gzip/zlib raise many types for a damaged file
        raise ValueError(f"{path}: unreadable or truncated NIfTI file ({error})") from error
    return CTVolume(_as_3d(array, path), np.asarray(image.affine, float), str(path))


#: ITK refuses degenerate headers itself, in a multi-line message; the reason in one line.
_ITK_GEOMETRY_ERRORS = {
    "Zero-valued spacing": "zero or non-finite voxel spacing in the header",
    "Bad direction": "the direction matrix in the header is singular (determinant 0)",
}


def _read_with_ants(path: Path) -> CTVolume:
    import ants

    try:
        image = ants.image_read(str(path))
        array = image.numpy().astype(np.float32, copy=False)
    except Exception as error:  # ITK reports every failure as a generic RuntimeError
        for marker, problem in _ITK_GEOMETRY_ERRORS.items():
            if marker in str(error):
                raise ValueError(f"{path}: degenerate geometry: {problem}") from error
        raise ValueError(f"{path}: unreadable or truncated image file ({error})") from error
    if image.dimension != 3 or image.components != 1:
        raise ValueError(
            f"{path}: expected a 3D single-channel volume, got {image.dimension}D with "
            f"{image.components} components"
        )
    check_geometry(np.eye(4), str(path), spacing=image.spacing)  # before it is folded in
    affine = ras_affine_from_lps(image.origin, image.spacing, image.direction)
    return CTVolume(_as_3d(array, path), affine, str(path))


def _read_dicom_series(folder: Path) -> CTVolume:
    """One DICOM series: slices sorted along the slice normal, rescaled to HU.

    The array axes are (column, row, slice), so that axis 0 runs along ImageOrientationPatient's
    row direction and axis 1 along its column direction, as in ITK.
    """
    import pydicom

    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(str(file))
        except Exception:  # non-DICOM files (DICOMDIR aside) are simply not slices
            continue
        if "PixelData" in dataset and "ImagePositionPatient" in dataset:
            slices.append(dataset)
    if len(slices) < 2:
        raise ValueError(f"{folder}: expected a DICOM series of at least 2 slices, found {len(slices)}")
    series = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; give one series per folder")

    orientation = np.asarray(slices[0].ImageOrientationPatient, float)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    if np.linalg.norm(normal) < MIN_DIRECTION_DETERMINANT * np.linalg.norm(row_cosine) * \
            np.linalg.norm(column_cosine):
        raise ValueError(f"{folder}: degenerate geometry: ImageOrientationPatient's row and "
                         f"column directions {orientation.tolist()} are (nearly) parallel or zero")
    positions = np.asarray([s.ImagePositionPatient for s in slices], float)
    order = np.argsort(positions @ normal)
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 1e-3) or np.ptp(gaps) > 0.01 * gaps.mean() + 1e-3:
        raise ValueError(
            f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3f}-{gaps.max():.3f} mm); "
            "duplicate or missing slices?"
        )
    try:
        array = np.stack(
            [
                slices[i].pixel_array.T.astype(np.float32) * float(slices[i].get("RescaleSlope", 1))
                + float(slices[i].get("RescaleIntercept", 0))
                for i in order
            ],
            axis=-1,
        )
    except Exception as error:
        raise ValueError(f"{folder}: unreadable DICOM pixel data ({error})") from error

    row_spacing, column_spacing = (float(v) for v in slices[0].PixelSpacing)
    check_geometry(np.eye(4), str(folder), spacing=(row_spacing, column_spacing))
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing  # along a row: the distance between columns
    lps[:3, 1] = column_cosine * row_spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return CTVolume(array, affine, str(folder))


def check_ct_intensities(volume: CTVolume) -> None:
    """Reject volumes that cannot be a CT in HU: NaN/inf voxels, or no air at all.

    Every chest CT holds air (outside the body and in the lungs) near -1000 HU; a volume whose
    darkest voxels are far above that was most likely stored without its rescale intercept.
    """
    array = volume.array
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(f"{volume.source}: {int((~finite).sum())} NaN or infinite voxels")
    low, high = float(array.min()), float(array.max())
    if low > -500 or low < -4000 or high > 40000:
        raise ValueError(
            f"{volume.source}: implausible HU range [{low:.0f}, {high:.0f}]; a CT in Hounsfield "
            "units has air near -1000 (missing rescale slope/intercept?)"
        )
