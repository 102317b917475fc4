"""Readers: every format gives the same world geometry for the same physical volume."""
import gzip

import ants
import nibabel as nib
import numpy as np
import pytest
from helpers import write_dicom_series

from drasclr.data.io import (
    CTVolume, check_ct_intensities, lps_geometry_from_ras, ras_affine_from_lps, read_ct, to_ants,
)


def _random_ct(rng, shape=(12, 10, 8)) -> np.ndarray:
    return rng.uniform(-1024, 400, size=shape).astype(np.float32)


def _oblique_affine(rng) -> np.ndarray:
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 1.5])
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


def _values_at_same_world_points(reference: CTVolume, other: CTVolume) -> np.ndarray:
    """``other``'s values at the world positions of every voxel of ``reference``."""
    index = np.indices(reference.array.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(reference.affine, index)
    other_index = nib.affines.apply_affine(np.linalg.inv(other.affine), world)
    rounded = np.rint(other_index).astype(int)
    assert np.allclose(other_index, rounded, atol=1e-3), "voxel grids do not coincide"
    return other.array[tuple(rounded.T)].reshape(reference.array.shape)


def test_lps_ras_round_trip():
    rng = np.random.default_rng(0)
    affine = _oblique_affine(rng)
    origin, spacing, direction = lps_geometry_from_ras(affine)
    np.testing.assert_allclose(ras_affine_from_lps(origin, spacing, direction), affine, atol=1e-12)
    # RAS x and y are LPS -x and -y.
    np.testing.assert_allclose(origin, affine[:3, 3] * [-1, -1, 1])


def test_nifti_and_ants_formats_agree_in_any_orientation(tmp_path):
    rng = np.random.default_rng(1)
    array, affine = _random_ct(rng), _oblique_affine(rng)
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "ct.nii.gz")
    reference = read_ct(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(reference.array, array)
    np.testing.assert_allclose(reference.affine, affine, atol=1e-5)

    # The same physical volume stored with axis 0 flipped and axes 1, 2 swapped.
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, array.shape[0] - 1
    swap = np.eye(4)[[0, 2, 1, 3]]
    reordered = np.flip(array, 0).transpose(0, 2, 1)
    reordered_affine = affine @ flip @ swap
    nib.save(nib.Nifti1Image(reordered, reordered_affine), tmp_path / "reordered.nii")
    for suffix in ("nrrd", "mha"):
        ants.image_write(to_ants(reordered, reordered_affine), str(tmp_path / f"ct.{suffix}"))

    for name in ("reordered.nii", "ct.nrrd", "ct.mha"):
        other = read_ct(tmp_path / name)
        assert other.array.dtype == np.float32
        np.testing.assert_allclose(_values_at_same_world_points(reference, other), array, atol=1e-3)


def test_dicom_series_matches_nifti_geometry(tmp_path):
    rng = np.random.default_rng(2)
    hu = np.rint(_random_ct(rng, (9, 7, 6)))
    spacing, origin_lps = (0.6, 0.7, 1.25), (10.0, -20.0, 30.0)
    write_dicom_series(tmp_path / "series", hu, spacing, origin_lps, rng)
    volume = read_ct(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, hu)
    expected = ras_affine_from_lps(origin_lps, spacing, np.eye(3))
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6)
    # The same volume written as NIfTI reads back with the same world geometry.
    nib.save(nib.Nifti1Image(hu, expected), tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(_values_at_same_world_points(volume, read_ct(tmp_path / "same.nii.gz")), hu)


def test_oblique_dicom_series_agrees_with_itk(tmp_path):
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(5)
    hu = np.rint(_random_ct(rng, (9, 7, 6)))
    rotation = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix()
    write_dicom_series(tmp_path / "series", hu, (0.6, 0.7, 1.25), (10.0, -20.0, 30.0), rng, rotation)
    volume = read_ct(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, hu)
    # ITK (through ANTs) reads one slice: its in-plane geometry and origin must be ours.
    first = min(tmp_path.joinpath("series").glob("*.dcm"), key=lambda p: int(p.stem[5:]))
    itk = ants.image_read(str(first))
    np.testing.assert_array_equal(itk.numpy()[:, :, 0], hu[:, :, 0])
    itk_affine = ras_affine_from_lps(itk.origin, itk.spacing, itk.direction)
    np.testing.assert_allclose(volume.affine[:, [0, 1, 3]], itk_affine[:, [0, 1, 3]], atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 2], 1.25 * itk_affine[:3, 2], atol=1e-6)


def test_bad_files_raise_clear_errors(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="no such file"):
        read_ct(tmp_path / "missing.nii.gz")

    nib.save(nib.Nifti1Image(_random_ct(rng, (20, 20, 20)), np.eye(4)), tmp_path / "ct.nii.gz")
    data = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.nii.gz: unreadable or truncated"):
        read_ct(tmp_path / "truncated.nii.gz")

    nib.save(nib.Nifti1Image(_random_ct(rng, (20, 20, 1)), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="flat.nii.gz: expected a 3D volume"):
        read_ct(tmp_path / "flat.nii.gz")

    (tmp_path / "garbage.mha").write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(ValueError, match="garbage.mha: unreadable"):
        read_ct(tmp_path / "garbage.mha")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: expected a DICOM series"):
        read_ct(tmp_path / "empty")


def test_intensity_checks():
    rng = np.random.default_rng(4)
    array = _random_ct(rng)
    check_ct_intensities(CTVolume(array, np.eye(4), "good"))
    with_nan = array.copy()
    with_nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="nan: 1 NaN"):
        check_ct_intensities(CTVolume(with_nan, np.eye(4), "nan"))
    with pytest.raises(ValueError, match="raw: implausible HU range"):
        check_ct_intensities(CTVolume(array + 1024, np.eye(4), "raw"))  # unrescaled storage
