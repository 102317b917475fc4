"""Isotropic resampling: separable B-spline equals scipy's, and physical positions are kept."""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from drasclr.data.io import CTVolume
from drasclr.data.resample import bspline_coefficients, resample_axis, resample_isotropic


@pytest.mark.parametrize("shape", [(9, 11, 7), (2, 5, 3), (40, 3, 4)])
def test_bspline_coefficients_match_scipy_float64(shape):
    array = np.random.default_rng(3).normal(size=shape)
    for axis in range(3):
        expected = ndimage.spline_filter1d(array, order=3, axis=axis, mode="mirror")
        np.testing.assert_allclose(bspline_coefficients(array, axis), expected, atol=2e-6)


def test_separable_bspline_matches_scipy_float64():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(9, 11, 7))
    positions = [rng.uniform(-1.5, 9.5, 13), np.linspace(0, 10, 6), rng.uniform(0, 6, 4)]
    result = array
    for axis, points in enumerate(positions):
        result = resample_axis(result, axis, points)
    grid = np.meshgrid(*positions, indexing="ij")
    expected = ndimage.map_coordinates(array, grid, order=3, mode="mirror")
    np.testing.assert_allclose(result, expected, atol=1e-5 * np.abs(expected).max())


def _world_centroid(volume: CTVolume) -> np.ndarray:
    weights = np.clip(volume.array + 1000, 0, None)
    index = np.indices(volume.array.shape).reshape(3, -1).T
    return nib.affines.apply_affine(volume.affine, index).T @ weights.ravel() / weights.sum()


def test_resampling_keeps_physical_positions():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.6, 0.75, 2.5])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    shape = (48, 40, 14)
    # A smooth blob around a random interior world point, on an air background.
    centre = nib.affines.apply_affine(affine, rng.uniform(0.35, 0.65, 3) * (np.array(shape) - 1))
    world = nib.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    blob = np.exp(-np.sum((world - centre) ** 2, axis=1) / (2 * 4.0**2)).reshape(shape)
    volume = CTVolume((blob * 1400 - 1000).astype(np.float32), affine, "blob")

    resampled = resample_isotropic(volume, 1.0)
    np.testing.assert_allclose(resampled.spacing, 1.0, atol=1e-9)
    np.testing.assert_allclose(resampled.affine[:3, 3], affine[:3, 3])  # same origin
    np.testing.assert_allclose(  # same axis directions
        resampled.affine[:3, :3], rotation, atol=1e-9
    )
    extent = (np.array(shape) - 1) * [0.6, 0.75, 2.5]
    np.testing.assert_array_equal(resampled.array.shape, np.floor(extent).astype(int) + 1)
    np.testing.assert_allclose(_world_centroid(resampled), _world_centroid(volume), atol=0.05)
    np.testing.assert_allclose(_world_centroid(resampled), centre, atol=0.05)


def test_isotropic_input_is_returned_as_is_and_bad_spacing_rejected():
    volume = CTVolume(np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32), np.eye(4), "x")
    assert resample_isotropic(volume, 1.0) is volume
    with pytest.raises(ValueError, match="spacing"):
        resample_isotropic(volume, 0.0)
