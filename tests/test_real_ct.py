"""Real chest CT through `drasclr preprocess`, checked against real lung masks.

Two real scans (../shared/data/real_ct; skipped when absent): LUNG1-001 (NSCLC-Radiomics), a
whole-thorax planning CT at 0.98 x 0.98 x 3 mm with the table, a tumour against the pleura and
lung contours drawn by clinicians; and COPDGene 10002K, an inspiration CT downsampled 8x (about
4 mm), with its whole-lung label map. The atlas is the authors' real atlas lung mask. Both scans
are preprocessed once per session, as a user would, through the command line
(``real_store`` in conftest.py).
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from real_data import COPD, LUNG1, REAL, REAL_CT_AVAILABLE, REFERENCE_MASKS, SCANS, SHARED_DATA
from drasclr.data.io import read_ct
from drasclr.data.lung_segmentation import LEFT, RIGHT, LungMask
from drasclr.data.registration import FORWARD_FILE, ras_matrix
from drasclr.data.store import PatchStore, lung_mask_path

#: Lung Dice after affine registration to the atlas, per scan.
MIN_REGISTRATION_DICE = {LUNG1: 0.83, COPD: 0.85}
#: Where the authors' pretrained checkpoint would be; it is not distributed with the data.
AUTHORS_CHECKPOINT = SHARED_DATA / "authors_checkpoint.pth.tar"

pytestmark = pytest.mark.skipif(not REAL_CT_AVAILABLE,
                                reason=f"real CT scans or the atlas mask not available under {SHARED_DATA}")


@pytest.fixture(scope="module")
def lung1():
    """LUNG1-001: (CT volume, reference labels 1 right / 2 left, body mask) on the scan's grid."""
    ct = read_ct(REAL / SCANS[LUNG1])
    reference = read_ct(REAL / REFERENCE_MASKS[LUNG1]).array.astype(np.uint8)
    return ct, reference, body_mask(ct.array)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest region above -500 HU, its holes filled slice by slice (the
    table is apart from it, across a gap of air)."""
    components, _ = ndimage.label(hu > -500)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    in_plane = ndimage.generate_binary_structure(3, 1)
    in_plane[1, 1, [0, 2]] = False
    return ndimage.binary_fill_holes(components == np.argmax(sizes), structure=in_plane)


def saved_labels(store, subject_id: str, shape, affine) -> np.ndarray:
    """The store's lung mask of a subject brought onto another grid (nearest)."""
    import nibabel as nib

    path = lung_mask_path(store, subject_id)
    assert subject_id in path.name and "mask" in path.name
    image = nib.load(str(path))
    return LungMask(np.asarray(image.dataobj), image.affine).on_grid(shape, affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_segmentation_matches_the_clinical_lung_contours(real_store, lung1):
    store, _ = real_store
    ct, reference, body = lung1
    labels = saved_labels(store, LUNG1, reference.shape, ct.affine)
    assert dice(labels > 0, reference > 0) >= 0.95
    for side, other in ((RIGHT, LEFT), (LEFT, RIGHT)):  # not swapped
        assert dice(labels == side, reference == side) >= 0.93
        assert dice(labels == side, reference == other) < 0.02

    # Air of the trachea and main bronchi: dark (< -900 HU) regions inside the body, outside
    # the lungs, spanning several slices between the lungs (single-slice ones are gaps of the
    # rasterised contours). The segmentation leaves them out.
    dark = body & (ct.array < -900) & (reference == 0)
    components, _ = ndimage.label(dark)
    lung_x = np.flatnonzero((reference > 0).any(axis=(1, 2)))
    tubes = [index for index, box in enumerate(ndimage.find_objects(components), start=1)
             if box[2].stop - box[2].start >= 3
             and lung_x.min() < (box[0].start + box[0].stop) / 2 < lung_x.max()]
    airway = np.isin(components, tubes)
    voxel_ml = abs(np.linalg.det(ct.affine[:3, :3])) / 1000
    assert airway.sum() * voxel_ml > 15  # the trachea is found
    assert (airway & (labels > 0)).sum() * voxel_ml < 2.0  # a main bronchus is about 4 ml


def test_registration_to_the_atlas_and_its_quality_flag(real_store):
    import ants

    store, atlas = real_store
    rows = {row["subject_id"]: row for row in PatchStore(store).manifest}
    # the atlas grid at 3 mm, in world mm
    index = np.stack(np.meshgrid(*[np.arange(0, n, 3) for n in atlas.mask.shape], indexing="ij"), -1)
    atlas_lung = atlas.mask[tuple(index.reshape(-1, 3).T)] > 0
    atlas_world = index.reshape(-1, 3) @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    for subject_id in SCANS:
        transform = ants.read_transform(str(store / "transforms" / subject_id / FORWARD_FILE))
        subject_world = atlas_world @ ras_matrix(transform)[:3, :3].T + ras_matrix(transform)[:3, 3]
        reference = read_ct(REAL / REFERENCE_MASKS[subject_id])
        voxel = np.rint((subject_world - reference.affine[:3, 3]) @ np.linalg.inv(reference.affine[:3, :3]).T)
        inside = np.all((voxel >= 0) & (voxel < reference.array.shape), axis=1)
        warped = np.zeros(len(voxel), bool)
        warped[inside] = reference.array[tuple(voxel[inside].astype(int).T)] > 0
        # the clinicians' lungs (not our segmentation) carried onto the atlas; an affine map
        # cannot undo the volume a tumour takes from LUNG1-001's right upper lobe
        overlap = dice(warped, atlas_lung)
        assert overlap >= MIN_REGISTRATION_DICE[subject_id], subject_id
        # and the pipeline's own lung mask, the one it registered
        own = saved_labels(store, subject_id, reference.array.shape, reference.affine)
        own_warped = np.zeros(len(voxel), bool)
        own_warped[inside] = own[tuple(voxel[inside].astype(int).T)] > 0
        assert dice(own_warped, atlas_lung) >= MIN_REGISTRATION_DICE[subject_id], subject_id
        # the registration's own check says the same
        assert rows[subject_id]["status"] == "done"
        assert abs(rows[subject_id]["dice"] - overlap) < 0.05, (subject_id, rows[subject_id]["dice"], overlap)


def test_density_measures_are_in_the_published_range(real_store):
    store, _ = real_store
    rows = {row["subject_id"]: row for row in PatchStore(store).manifest}
    lung1 = rows[LUNG1]
    assert 0.5 < lung1["laa950_percent"] < 10  # a non-emphysematous lung: a few %
    assert -880 < lung1["mean_lung_density_hu"] < -800
    assert 3500 < lung1["lung_volume_ml"] < 6500

    ct, labels = read_ct(REAL / SCANS[COPD]), read_ct(REAL / REFERENCE_MASKS[COPD])
    direct = 100 * np.mean(ct.array[labels.array > 0] < -950)
    assert abs(rows[COPD]["laa950_percent"] - direct) <= 3, (rows[COPD]["laa950_percent"], direct)


def test_landmark_patches_lie_in_the_body_and_follow_the_atlas_lungs(real_store, lung1):
    import ants

    store, atlas = real_store
    ct, reference, body = lung1
    transform = ants.read_transform(str(store / "transforms" / LUNG1 / FORWARD_FILE))
    to_subject = ras_matrix(transform)
    # every voxel of every patch (on a 2-voxel step), as a world point of the scan
    offsets = np.stack(np.meshgrid(*[np.arange(0, atlas.patch_size, 2)] * 3, indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3) - (atlas.patch_size - 1) / 2
    centres = atlas.centres_world() @ to_subject[:3, :3].T + to_subject[:3, 3]
    # the patches are cut on the 1 mm grid along the scan's axes
    directions = ct.affine[:3, :3] / np.linalg.norm(ct.affine[:3, :3], axis=0)
    points = centres[:, None, :] + offsets @ directions.T
    voxel = np.rint((points - ct.affine[:3, 3]) @ np.linalg.inv(ct.affine[:3, :3]).T).astype(int)
    inside_scan = np.all((voxel >= 0) & (voxel < ct.array.shape), axis=-1)
    clipped = np.clip(voxel, 0, np.asarray(ct.array.shape) - 1)
    in_body = body[tuple(np.moveaxis(clipped, -1, 0))] & inside_scan
    lung = (reference[tuple(np.moveaxis(clipped, -1, 0))] > 0) & inside_scan

    centre_voxel = np.rint((centres - ct.affine[:3, 3]) @ np.linalg.inv(ct.affine[:3, :3]).T).astype(int)
    assert body[tuple(centre_voxel.T)].all()  # every landmark inside the patient
    assert in_body.mean(axis=1).min() > 0.5  # and most of each patch

    size = atlas.patch_size
    expected = [np.mean(atlas.mask[i:i + size, j:j + size, k:k + size] > 0) for i, j, k in atlas.corners]
    assert np.corrcoef(lung.mean(axis=1), expected)[0, 1] >= 0.8


@pytest.mark.parametrize("kind", ["drasclr", "authors"])
def test_checkpoints_give_finite_features_on_the_real_scans(real_store, tmp_path, kind):
    from drasclr.intensity import normalise_hu
    from drasclr import load_encoder

    store, atlas = real_store
    if kind == "authors":
        if not AUTHORS_CHECKPOINT.exists():
            pytest.skip(f"the authors' pretrained checkpoint is not available ({AUTHORS_CHECKPOINT})")
        path = AUTHORS_CHECKPOINT
    else:
        from drasclr.nn import Encoder
        from drasclr.pretrain.checkpoints import save_checkpoint

        torch.manual_seed(0)
        encoder = Encoder(rep_dim=16, moco_dim=8, num_experts=2, backend="grouped")
        path = save_checkpoint({"encoder_q": encoder.state_dict(), "encoder_config": encoder.config},
                               tmp_path / "encoder_epoch_0000.pt")
    # the encoder as `drasclr features` loads it, on a spread of landmarks of both scans
    encoder = load_encoder(path)
    patches = PatchStore(store)
    landmarks = np.arange(0, atlas.num_landmarks, 29)
    features = []
    with torch.no_grad():
        for subject in range(patches.num_subjects):
            x = normalise_hu(torch.from_numpy(patches.gather(subject, landmarks)))[:, None]
            features.append(encoder(x, torch.as_tensor(atlas.coords[landmarks])).mean(0).numpy())
    assert patches.subject_ids == [COPD, LUNG1]
    assert np.isfinite(features).all()
    # two different scans give different features
    assert not np.allclose(features[0], features[1])
