"""The authors' preprocessing conventions (docs/method.md#patch-axis-order): their patches are
SimpleITK arrays, so the authors' encoder must see drasclr's patches transposed.

The authors' chain is re-stated here with SimpleITK, as their patch script runs it: resample
to 1 mm with a B-spline (origin and directions kept), pad 60 voxels of -1024 on every side,
map each atlas landmark corner (an ITK index of the atlas) to the subject through the atlas ->
subject transform, take the nearest voxel index, cut ``RegionOfInterest`` there and turn it
into an array. drasclr's chain runs on the same file: ``read_ct`` -> ``resample_isotropic`` ->
the landmark centres mapped -> ``cut_patches``.
"""
import nibabel as nib
import numpy as np
import pytest
import torch

from drasclr.data.atlas import Atlas, normalised_coords
from drasclr.data.io import LPS_FLIP, read_ct
from drasclr.data.patches import cut_patches
from drasclr.data.resample import resample_isotropic
from drasclr.nn import Encoder

sitk = pytest.importorskip("SimpleITK")

PATCH = 32


def authors_isotropic(image):
    """1 mm B-spline resampling with the input's origin and directions (their patch script)."""
    spacing, size = np.asarray(image.GetSpacing()), np.asarray(image.GetSize())
    out_size = [int(size[0] * spacing[0]), int(size[1] * spacing[1]), int((size[2] - 1) * spacing[2])]
    return sitk.Resample(image, [int(n) for n in out_size], sitk.Transform(), sitk.sitkBSpline,
                         image.GetOrigin(), (1.0, 1.0, 1.0), image.GetDirection(), -1024.0)


def authors_patches(scan_path, atlas_image, corners, atlas_to_subject):
    image = sitk.ConstantPad(authors_isotropic(sitk.ReadImage(str(scan_path))),
                             [60] * 3, [60] * 3, -1024)
    patches = []
    for corner in corners.tolist():
        atlas_point = atlas_image.TransformIndexToPhysicalPoint(corner)
        index = image.TransformPhysicalPointToIndex(atlas_to_subject.TransformPoint(atlas_point))
        region = sitk.RegionOfInterest(image, [PATCH] * 3, index)
        patches.append(sitk.GetArrayFromImage(region))
    return np.stack(patches)


@pytest.fixture
def scan_and_atlas(tmp_path):
    """A random 'scan' of anisotropic voxels with a flipped x axis (as the authors' atlas
    has), an atlas grid, and grid corners whose patches lie inside the scan."""
    rng = np.random.default_rng()
    scan = rng.normal(-500, 300, size=(70, 64, 40)).astype(np.float32)
    affine = np.diag([-0.8, 0.9, 1.6, 1.0])
    affine[:3, 3] = (40.0, -25.0, -60.0)
    scan_path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), str(scan_path))
    atlas_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    atlas_affine[:3, 3] = (30.0, -20.0, -50.0)
    atlas_path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((60, 60, 60), np.int16), atlas_affine), str(atlas_path))
    corners = np.array([[a, b, c] for a in (0, 7, 13) for b in (2, 9) for c in (0, 5)])
    return scan_path, atlas_path, atlas_affine, corners


def test_authors_patches_are_drasclr_patches_with_z_y_x_axes(scan_and_atlas):
    scan_path, atlas_path, atlas_affine, corners = scan_and_atlas
    shift_ras = np.array([-3.0, 4.0, 2.0])  # the "registration": atlas -> subject, whole mm
    authors = authors_patches(scan_path, sitk.ReadImage(str(atlas_path)), corners,
                              sitk.TranslationTransform(3, (LPS_FLIP @ shift_ras).tolist()))

    volume = resample_isotropic(read_ct(scan_path), 1.0)
    atlas = Atlas(corners=corners, coords=normalised_coords(corners),
                  neighbours=np.zeros((len(corners), 0), np.int64), mask=np.zeros((60, 60, 60), np.uint8),
                  affine=atlas_affine, patch_size=PATCH, step=1, min_lung_fraction=0.1, source="")
    to_voxel = np.linalg.inv(volume.affine)
    centres = (atlas.centres_world() + shift_ras) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    ours = cut_patches(volume.array, centres, PATCH)

    assert authors.shape == ours.shape
    np.testing.assert_allclose(authors, ours.transpose(0, 3, 2, 1), atol=0.05)
    assert not np.allclose(authors, ours, atol=50)  # the axis order matters


def test_encoder_of_authors_axes_transposes_our_patches():
    torch.manual_seed(0)
    ours = Encoder(num_experts=2, backend="grouped", patch_axes="zyx").double().eval()
    plain = Encoder(num_experts=2, backend="grouped").double().eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(6, 1, PATCH, PATCH, PATCH, dtype=torch.float64)
    loc = torch.rand(6, 3, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, loc), plain(x.permute(0, 1, 4, 3, 2), loc))
        assert not torch.allclose(ours(x, loc), plain(x, loc), rtol=1e-4, atol=0)
    assert Encoder(**ours.config).patch_axes == "zyx"
    with pytest.raises(ValueError, match="patch_axes"):
        Encoder(patch_axes="yxz")
