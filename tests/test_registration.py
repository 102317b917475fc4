"""Registration: a known affine is recovered, in the right direction, on RAS coordinates."""
import ants
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from drasclr.data.lung_segmentation import LungMask, block_mean
from drasclr.data.registration import ras_matrix, register_to_atlas


def _known_affine(centre: np.ndarray) -> np.ndarray:
    """atlas world -> subject world: 6-degree rotation, 0.93 scale about ``centre``, a shift."""
    linear = Rotation.from_euler("xyz", [6, -3, 4], degrees=True).as_matrix() * 0.93
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ centre + [7.0, -5.0, 9.0]
    return affine


def _subject_under(atlas: LungMask, atlas_to_subject: np.ndarray, spacing: float) -> LungMask:
    """The atlas lungs moved by a known affine, on a grid of ``spacing`` mm in LPS-like axes."""
    shape = np.asarray(atlas.labels.shape)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    centre = nib.affines.apply_affine(atlas.affine, (shape - 1) / 2)
    affine[:3, 3] = centre - affine[:3, :3] @ ((shape - 1) / 2)
    to_atlas_voxel = np.linalg.inv(atlas.affine) @ np.linalg.inv(atlas_to_subject) @ affine
    labels = ndimage.affine_transform(atlas.labels, to_atlas_voxel[:3, :3], to_atlas_voxel[:3, 3],
                                      output_shape=tuple(shape), order=0)
    return LungMask(labels, affine)


def test_ras_matrix_agrees_with_ants_point_mapping(tmp_path):
    rng = np.random.default_rng(0)
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3,
        matrix=np.eye(3) + 0.1 * rng.normal(size=(3, 3)), translation=rng.normal(0, 5, 3),
        center=rng.normal(0, 20, 3),
    )
    ants.write_transform(transform, str(tmp_path / "t.mat"))
    matrix = ras_matrix(ants.read_transform(str(tmp_path / "t.mat")))
    points_ras = rng.normal(0, 50, size=(6, 3))
    flip = np.array([-1.0, -1.0, 1.0])
    lps = pd.DataFrame(points_ras * flip, columns=["x", "y", "z"])
    mapped_lps = ants.apply_transforms_to_points(3, lps, [str(tmp_path / "t.mat")]).to_numpy()
    np.testing.assert_allclose(nib.affines.apply_affine(matrix, points_ras), mapped_lps * flip, atol=1e-3)


def test_known_affine_recovered_on_real_atlas_mask(atlas_mask_path, tmp_path):
    image = nib.load(atlas_mask_path)
    # 2 mm copy of the real atlas (50/100 labels) keeps the test fast.
    right, affine = block_mean(np.asarray(image.dataobj) == 50, image.affine, (2, 2, 2))
    left, _ = block_mean(np.asarray(image.dataobj) == 100, image.affine, (2, 2, 2))
    atlas = LungMask(np.where(right > 0.5, 50, 0) + np.where(left > 0.5, 100, 0), affine)
    lung_points = nib.affines.apply_affine(affine, np.argwhere(atlas.labels > 0)[::97])
    truth = _known_affine(lung_points.mean(axis=0))
    subject = _subject_under(atlas, truth, spacing=2.5)

    files = (tmp_path / "tx" / "atlas_to_subject.mat", tmp_path / "tx" / "subject_to_atlas.mat")
    result = register_to_atlas(subject, atlas, "fast", transform_files=files)

    error = np.linalg.norm(result.map_points(lung_points) - nib.affines.apply_affine(truth, lung_points),
                           axis=1)
    assert error.mean() < 1.0 and error.max() < 2.5, (error.mean(), error.max())
    assert result.dice > 0.95
    # The files hold the forward transform and its inverse; nothing else is left behind.
    assert sorted(p.name for p in files[0].parent.iterdir()) == sorted(p.name for p in files)
    np.testing.assert_allclose(ras_matrix(ants.read_transform(str(files[0]))), result.atlas_to_subject,
                               atol=1e-6)
    np.testing.assert_allclose(
        ras_matrix(ants.read_transform(str(files[1]))) @ result.atlas_to_subject, np.eye(4), atol=1e-3
    )


def test_bad_schedule_and_empty_mask():
    atlas = LungMask(np.zeros((20, 20, 20), dtype=np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="schedule: expected one of"):
        register_to_atlas(atlas, atlas, "slow")
    with pytest.raises(ValueError, match="lung mask is empty"):
        register_to_atlas(atlas, atlas, "fast")


def test_saved_registration_reads_back_as_the_inverse_mapping(tmp_path):
    """load_subject_to_atlas reads the inverse file that process_subject saves: composing it with
    the forward mapping gives the identity; a missing folder names the file and the fix."""
    import ants

    from drasclr.data.registration import FORWARD_FILE, INVERSE_FILE, load_subject_to_atlas

    rng = np.random.default_rng(2)
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3,
        matrix=np.eye(3) + rng.normal(0, 0.05, (3, 3)), translation=rng.normal(0, 5, 3),
        center=rng.normal(0, 10, 3),
    )
    ants.write_transform(transform, str(tmp_path / FORWARD_FILE))
    ants.write_transform(transform.invert(), str(tmp_path / INVERSE_FILE))
    forward = ras_matrix(transform)
    np.testing.assert_allclose(load_subject_to_atlas(tmp_path) @ forward, np.eye(4), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="subject_to_atlas.mat: no saved registration"):
        load_subject_to_atlas(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INVERSE_FILE).write_text("not a transform")
    with pytest.raises(ValueError, match="not an affine transform file"):
        load_subject_to_atlas(tmp_path / "bad")
