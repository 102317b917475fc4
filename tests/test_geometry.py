"""degenerate geometry ends as a failed subject whose reason names the
geometry problem; a header that likely contradicts the anatomy (mirrored left-right) gives the
subject a manifest warning, not a failure."""
import math

import nibabel as nib
import numpy as np
import pytest

from drasclr.data.io import CTVolume, check_geometry, read_ct
from drasclr.data.laterality import laterality_warning, right_to_left_ratio
from drasclr.data.subject import SubjectError, process_subject
from helpers import good_atlas, write_dicom_series


def ct(rng, shape=(10, 9, 8)):
    return rng.uniform(-1024, 300, size=shape).astype(np.float32)


def affine_with(columns, origin=(1.0, -2.0, 3.0)):
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, float).T
    affine[:3, 3] = origin
    return affine


NIFTI_GEOMETRIES = {
    "zero spacing on axis 1": (affine_with([[0.8, 0, 0], [0, 0, 0], [0, 0, 1.5]]),
                               r"zero voxel spacing along array axis \[1\]"),
    "all zero": (affine_with(np.zeros((3, 3))), r"zero voxel spacing along array axis \[0, 1, 2\]"),
    "two parallel axes": (affine_with([[0.8, 0, 0], [0.8, 0, 0], [0, 0, 1.5]]),
                          "the direction cosines are singular or nearly so"),
    "axes 3 degrees apart": (affine_with([[1, 0, 0], [math.cos(0.05), math.sin(0.05), 0],
                                          [0, 0, 1]]),
                             r"the direction cosines are singular or nearly so \(\|det\| 0.05"),
    "axis in the plane of the other two": (affine_with([[1, 0, 0], [0, 1, 0], [0.7, 0.7, 0.0]]),
                                           "the direction cosines are singular or nearly so"),
}


@pytest.mark.parametrize("case", list(NIFTI_GEOMETRIES))
def test_degenerate_nifti_geometry_is_named(tmp_path, case):
    affine, message = NIFTI_GEOMETRIES[case]
    path = tmp_path / "ct.nii.gz"
    image = nib.Nifti1Image(ct(np.random.default_rng(0)), np.eye(4))
    image.set_sform(affine, code=2)  # as a scanner or a script writes it; the qform cannot hold
    image.set_qform(np.eye(4), code=0)  # a degenerate matrix, so it is switched off
    nib.save(image, path)
    with pytest.raises(ValueError, match=rf"^{path}: degenerate geometry: {message}"):
        read_ct(path)


@pytest.mark.parametrize("header,message", [
    ("ElementSpacing = 0 1 1", "zero or non-finite voxel spacing"),
    ("ElementSpacing = nan 1 1", "zero or non-finite voxel spacing"),
    ("TransformMatrix = 1 0 0 1 0 0 0 0 1\nElementSpacing = 1 1 1", "the direction matrix .* singular"),
])
def test_degenerate_itk_geometry_is_one_line(tmp_path, header, message):
    path = tmp_path / "ct.mha"
    data = np.full((6, 6, 6), -1000, np.int16).tobytes()
    path.write_bytes(("ObjectType = Image\nNDims = 3\nDimSize = 6 6 6\n" + header +
                      "\nElementType = MET_SHORT\nElementDataFile = LOCAL\n").encode() + data)
    with pytest.raises(ValueError, match=rf"^{path}: degenerate geometry: {message}") as caught:
        read_ct(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("spacing,orientation,message", [
    ((0.0, 0.7, 1.0), np.eye(3), r"voxel spacing \[0.7, 0.0\]"),
    ((-0.7, 0.7, 1.0), np.eye(3), r"voxel spacing \[0.7, -0.7\]"),
    ((0.7, 0.7, 1.0), np.array([[1.0, 1, 0], [0, 0, 0], [0, 0, 1]]),
     r"ImageOrientationPatient's row and column directions .* are \(nearly\) parallel"),
])
def test_degenerate_dicom_geometry_is_named(tmp_path, spacing, orientation, message):
    rng = np.random.default_rng(3)
    folder = tmp_path / "series"
    write_dicom_series(folder, np.rint(ct(rng, (6, 5, 4))), spacing, (1, 2, 3), rng, orientation)
    with pytest.raises(ValueError, match=rf"^{folder}: degenerate geometry: {message}"):
        read_ct(folder)


def test_good_oblique_and_mirrored_geometry_pass():
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))
    for columns in (rotation @ np.diag([0.7, 0.8, 1.5]), np.diag([-0.8, 0.8, 2.5])):
        check_geometry(affine_with(columns.T), "x")
    with pytest.raises(ValueError, match="^x: degenerate geometry: the voxel-to-world affine"):
        check_geometry(affine_with([[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]]), "x")


def test_degenerate_subject_fails_with_the_geometry_reason(tmp_path):
    """The per-subject pipeline (what `drasclr preprocess` records in the manifest)."""
    volume = CTVolume(ct(np.random.default_rng(1)),
                      affine_with([[0.8, 0, 0], [0.8, 0.01, 0], [0, 0, 1.5]]), "sub7.nii.gz")
    with pytest.raises(SubjectError, match=r"^sub7.nii.gz: degenerate geometry: the direction "
                                           "cosines are singular"):
        process_subject(volume, good_atlas())


# -- laterality ---------------------------------------------------------------------------------

def two_lungs(right_voxels, left_voxels, rng):
    labels = np.zeros(4000, np.uint8)
    labels[:right_voxels] = 1
    labels[right_voxels:right_voxels + left_voxels] = 2
    return rng.permutation(labels).reshape(20, 20, 10)


@pytest.mark.parametrize("right,left,warned", [
    (1100, 1000, False),  # a typical adult: right about 10 % larger
    (1000, 1000, False),
    (960, 1000, False),   # within the normal spread
    (900, 1000, True),    # right clearly smaller: a mirrored header would do this
    (600, 1400, True),
    (0, 1000, True),      # no lung on the image's right at all
])
def test_laterality_warning_flags_a_smaller_right_lung(right, left, warned):
    ratio = right_to_left_ratio(two_lungs(right, left, np.random.default_rng(right)))
    assert ratio == pytest.approx(right / left)
    warning = laterality_warning(ratio)
    assert bool(warning) == warned
    if warned:
        assert warning.startswith(f"laterality: the lung on the image's right (larger RAS x) is "
                                  f"{right / left:.2f} times") and "mirrored" in warning


def test_mirroring_the_header_swaps_the_sides():
    """The segmentation names sides by RAS x: flipping x (a mirrored header) relabels the
    larger lung as the left one, and the ratio inverts."""
    from drasclr.data.lung_segmentation import split_left_right

    lungs = np.zeros((40, 10, 10), bool)
    lungs[2:17] = True   # 15 slabs at low x
    lungs[22:34] = True  # 12 slabs at high x
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    mirrored = affine.copy()
    mirrored[0, 0], mirrored[0, 3] = -1.0, 39.0
    ratio = right_to_left_ratio(split_left_right(lungs, affine))
    ratio_mirrored = right_to_left_ratio(split_left_right(lungs, mirrored))
    assert ratio == pytest.approx(12 / 15) and ratio_mirrored == pytest.approx(15 / 12)
    assert laterality_warning(ratio) and not laterality_warning(ratio_mirrored)
    assert laterality_warning(None) == laterality_warning(math.nan) == ""
