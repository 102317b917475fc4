"""Classical lung segmentation against the synthetic template's true lungs."""
import importlib.util

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from drasclr.data.io import CTVolume
from drasclr.data.lung_segmentation import LEFT, RIGHT, block_mean, segment_lungs, split_left_right


@pytest.fixture(scope="module")
def template():
    from drasclr.data.synthetic.anatomy import template_anatomy

    return template_anatomy("small")


def _truth_on_grid(labels: np.ndarray, affine: np.ndarray, mask) -> np.ndarray:
    """True labels resampled (nearest) onto the segmentation's grid."""
    to_truth = np.linalg.inv(affine) @ mask.affine
    return ndimage.affine_transform(labels, to_truth[:3, :3], to_truth[:3, 3],
                                    output_shape=mask.labels.shape, order=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_segmentation_finds_each_lung(template):
    rng = np.random.default_rng(0)
    hu = template.hu + rng.normal(0, 20, template.hu.shape).astype(np.float32)
    mask = segment_lungs(CTVolume(hu, template.affine, "template"))
    truth = _truth_on_grid(template.lung, template.affine, mask)
    for side in (RIGHT, LEFT):  # the synthetic labels are 1 right (larger x), 2 left, too
        assert _dice(mask.labels == side, truth == side) > 0.93
    true_ml = np.count_nonzero(template.lung) / 1000
    assert abs(mask.volume_ml - true_ml) < 0.1 * true_ml

    # The trachea and main bronchi (air inside the body that is not lung) are left out, but
    # for the ends of the bronchi within the lungs.
    in_plane = ndimage.generate_binary_structure(3, 1)
    in_plane[1, 1, [0, 2]] = False
    air, _ = ndimage.label(template.hu < -900, structure=in_plane)
    edge = np.unique(np.concatenate([air[[0, -1]].ravel(), air[:, [0, -1]].ravel()]))
    airway = (template.lung == 0) & (air > 0) & ~np.isin(air, edge)
    airway = _truth_on_grid(airway.astype(np.uint8), template.affine, mask) > 0
    assert airway.sum() > 200
    assert (airway & (mask.labels > 0)).sum() < 0.3 * airway.sum()


def test_touching_lungs_are_split_at_the_midline(template):
    hu = template.hu.copy()
    # Join the lungs by a block of lung tissue across the mediastinum.
    i, j, k = np.argwhere(template.lung > 0).mean(axis=0).astype(int)
    hu[i - 25: i + 25, j - 6: j + 6, k - 6: k + 6] = -850
    mask = segment_lungs(CTVolume(hu, template.affine, "joined"))
    assert ndimage.label(mask.labels > 0)[1] == 1  # one component: cut, not separated
    truth = _truth_on_grid(template.lung, template.affine, mask)
    for side in (RIGHT, LEFT):
        assert _dice(mask.labels == side, truth == side) > 0.85


def test_split_left_right_by_components_and_by_plane():
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # array axis 0 runs towards the left
    lungs = np.zeros((20, 6, 6), dtype=bool)
    lungs[2:7, 1:5, 1:5] = True  # small i: large RAS x: right lung
    lungs[11:18, 1:5, 1:5] = True
    labels = split_left_right(lungs, affine)
    assert (labels[2:7] [lungs[2:7]] == RIGHT).all() and (labels[11:18][lungs[11:18]] == LEFT).all()
    lungs[7:11, 2:4, 2:4] = True  # now one component: cut at the plane x = -9.5
    labels = split_left_right(lungs, affine, midline_x=-9.5)
    np.testing.assert_array_equal(np.unique(labels[:10][lungs[:10]]), [RIGHT])
    np.testing.assert_array_equal(np.unique(labels[10:][lungs[10:]]), [LEFT])


def test_block_mean_keeps_positions():
    rng = np.random.default_rng(1)
    affine = np.diag([0.9, 1.1, 1.3, 1.0])
    affine[:3, 3] = rng.normal(size=3)
    array = rng.random((12, 9, 10)).astype(np.float32)
    reduced, reduced_affine = block_mean(array, affine, (2, 3, 2))
    assert reduced.shape == (6, 3, 5)
    np.testing.assert_allclose(reduced[1, 2, 3], array[2:4, 6:9, 6:8].mean(), rtol=1e-6)
    # The reduced voxel sits at the centre of its block.
    block_centre = nib.affines.apply_affine(affine, [2.5, 7.0, 6.5])
    np.testing.assert_allclose(nib.affines.apply_affine(reduced_affine, [1, 2, 3]), block_centre)


def test_air_only_and_unknown_or_missing_methods():
    air = CTVolume(np.full((30, 30, 30), -1000.0, dtype=np.float32), np.eye(4), "air")
    assert segment_lungs(air).volume_ml == 0
    with pytest.raises(ValueError, match="segmentation: expected one of"):
        segment_lungs(air, "otsu")
    if importlib.util.find_spec("lungmask") is None:
        with pytest.raises(ValueError, match="lungmask package .* not installed"):
            segment_lungs(air, "lungmask")
