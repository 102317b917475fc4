"""Subject features (SPEC section 8) against a direct per-patch computation."""
import nibabel as nib
import numpy as np
import pytest
import torch

from drasclr.data.atlas import build_atlas
from drasclr.data.store import PatchStore, create_store, write_subject
from drasclr.features import subject_features
from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """An atlas with a handful of landmarks and a store of 3 subjects with random HU patches."""
    root = tmp_path_factory.mktemp("features")
    mask = np.zeros((70, 60, 60), np.uint8)
    mask[8:62, 8:40, 10:50] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "mask.nii.gz")
    atlas = build_atlas(root / "mask.nii.gz")
    atlas_path = root / "atlas.npz"
    atlas.save(atlas_path)
    create_store(root / "store", atlas, atlas_path)
    rng = np.random.default_rng(7)
    for i in range(3):
        level = (-900, -500, 0)[i]  # subjects differ in tissue density, so their features must too
        noise = rng.normal(0, 150, size=(atlas.num_landmarks, 32, 32, 32))
        patches = (level + noise).clip(-1100, 300).astype(np.int16)
        write_subject(root / "store", f"s{i}", source=f"s{i}.nii.gz", patches=patches)
    return atlas, PatchStore(root / "store")


def test_normalise_hu_window():
    hu = torch.tensor([-2000.0, -1024.0, -392.0, 240.0, 900.0])
    assert torch.allclose(normalise_hu(hu), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))


def test_subject_features_are_mean_patch_representations(tiny_store):
    atlas, store = tiny_store
    assert atlas.num_landmarks >= 3
    torch.manual_seed(0)
    encoder = Encoder(num_experts=2, backend="grouped")
    # Calibrate BatchNorm statistics on the store's patches, as training would: with the
    # default statistics an untrained encoder maps every input to nearly the same h.
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # cumulative average
    subject_index = np.repeat(np.arange(store.num_subjects), atlas.num_landmarks)
    landmark_index = np.tile(np.arange(atlas.num_landmarks), store.num_subjects)
    with torch.no_grad():
        encoder(normalise_hu(torch.from_numpy(store.gather(subject_index, landmark_index)))[:, None],
                torch.as_tensor(atlas.coords)[landmark_index])
    encoder.eval()

    features = subject_features(encoder, store, atlas.coords, subjects_per_batch=2,
                                landmarks_per_batch=2)

    coords = torch.as_tensor(atlas.coords)
    with torch.no_grad():
        expected = np.stack([
            np.mean([
                encoder(normalise_hu(torch.from_numpy(store.subject_patches(s)[j].copy()))[None, None],
                        coords[j]).numpy()[0]
                for j in range(atlas.num_landmarks)
            ], axis=0)
            for s in range(store.num_subjects)
        ])
    assert features.shape == (store.num_subjects, 128)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(features[0] - features[2]).max() > 1e-3  # subjects differ


def test_subject_features_rejects_foreign_coords(tiny_store):
    atlas, store = tiny_store
    with pytest.raises(ValueError, match="landmarks"):
        subject_features(Encoder(num_experts=2), store, atlas.coords[:-1])


def test_feature_set_round_trip_and_bad_files(tmp_path):
    from drasclr.features import FeatureSet

    rng = np.random.default_rng(3)
    saved = FeatureSet(["b", "a", "c"], rng.normal(size=(3, 5)).astype(np.float32),
                       {"name": "DrasCLR", "encoder": "checkpoint"})
    loaded = FeatureSet.load(saved.save(tmp_path / "f.npz"))
    assert loaded.subject_ids == ["b", "a", "c"] and loaded.name == "DrasCLR"
    np.testing.assert_array_equal(loaded.features, saved.features)
    assert loaded.metadata == saved.metadata

    with pytest.raises(FileNotFoundError, match="missing.npz: no such features file"):
        FeatureSet.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz: not a drasclr features file"):
        FeatureSet.load(tmp_path / "junk.npz")
    broken = saved.features.copy()
    broken[1, 2] = np.nan
    FeatureSet(saved.subject_ids, broken, {}).save(tmp_path / "nan.npz")
    with pytest.raises(ValueError, match="nan.npz: non-finite features for 1 subject.*: a"):
        FeatureSet.load(tmp_path / "nan.npz")
    FeatureSet(["a", "a"], saved.features[:2], {}).save(tmp_path / "dup.npz")
    with pytest.raises(ValueError, match="more than once"):
        FeatureSet.load(tmp_path / "dup.npz")
