"""Feature extraction (``extract_features``, ``drasclr features``) and the features file."""
import copy
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import authors_layout

from drasclr.checkpoint_formats import (
    AUTHORS_CHECKPOINT,
    ENCODER_FILE,
    TRAINING_CHECKPOINT,
    CheckpointError,
    read_encoder_file,
)
from drasclr.cli import main as cli_main
from drasclr.data.atlas import build_atlas
from drasclr.data.store import PatchStore, create_store, write_subject
from drasclr.features import FeatureSet, extract_features
from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from drasclr.pretrain.checkpoints import save_checkpoint

SMALL = dict(rep_dim=16, moco_dim=8, num_experts=2)  # a small head: fast, same backbone


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """An atlas with 8 landmarks and a store of 3 subjects with random HU patches."""
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
        patches = (level + noise).clip(-1024, 240).astype(np.int16)  # the stored HU window
        write_subject(root / "store", f"s{i}", source=f"s{i}.nii.gz", patches=patches)
    return atlas, PatchStore(root / "store")


def calibrated_encoder(store, atlas, seed=0, **config):
    """An untrained encoder whose BatchNorm statistics come from the store's patches, as
    training would leave them: with the initial statistics every input gives nearly the same h."""
    torch.manual_seed(seed)
    encoder = Encoder(**{**SMALL, "backend": "grouped", **config})
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # cumulative average
    subject_index = np.repeat(np.arange(store.num_subjects), atlas.num_landmarks)
    landmark_index = np.tile(np.arange(atlas.num_landmarks), store.num_subjects)
    with torch.no_grad():
        encoder(normalise_hu(torch.from_numpy(store.gather(subject_index, landmark_index)))[:, None],
                torch.as_tensor(atlas.coords)[landmark_index])
    return encoder.eval()


def float64_patch_features(encoder, store, atlas) -> np.ndarray:
    """(subjects, landmarks, rep_dim): the encoder in float64, one patch at a time (loop
    backend), on the HU window mapped to [-1, 1] in float64."""
    reference = copy.deepcopy(encoder).double().eval()
    reference.backend = "loop"
    coords = torch.as_tensor(atlas.coords, dtype=torch.float64)
    out = np.empty((store.num_subjects, atlas.num_landmarks, encoder.rep_dim))
    with torch.no_grad():
        for s in range(store.num_subjects):
            for j in range(atlas.num_landmarks):
                hu = np.asarray(store.subject_patches(s)[j], dtype=np.float64)
                x = (np.clip(hu, -1024, 240) + 1024) / 632 - 1
                out[s, j] = reference(torch.from_numpy(x)[None, None], coords[j]).numpy()[0]
    return out


@pytest.fixture(scope="module")
def encoder_and_reference(tiny_store):
    atlas, store = tiny_store
    encoder = calibrated_encoder(store, atlas)
    return encoder, float64_patch_features(encoder, store, atlas)


def test_normalise_hu_window():
    hu = torch.tensor([-2000.0, -1024.0, -392.0, 240.0, 900.0])
    assert torch.allclose(normalise_hu(hu), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("batch_size", [2, 7, 256])  # blocks of subjects; 2 landmarks; all at once
def test_features_match_a_float64_per_patch_computation(tiny_store, encoder_and_reference,
                                                        tmp_path, batch_size):
    atlas, store = tiny_store
    encoder, expected = encoder_and_reference
    result = extract_features(encoder, store, out=tmp_path / "f.npz", patches=True,
                              patch_dtype="float32", batch_size=batch_size, device="cpu",
                              progress=False)

    assert result.subject_ids == ["s0", "s1", "s2"]
    np.testing.assert_allclose(result.features, expected.mean(axis=1), rtol=1e-4, atol=1e-5)
    patches = np.load(tmp_path / "f.patches.npy", mmap_mode="r")
    assert patches.dtype == np.float32 and patches.shape == expected.shape
    np.testing.assert_allclose(patches, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(result.features[0] - result.features[2]).max() > 0.1  # subjects differ
    assert np.abs(patches[0, 0] - patches[0, 1]).max() > 1e-3  # landmarks differ


def test_patch_file_round_trips_as_float16(tiny_store, encoder_and_reference, tmp_path):
    atlas, store = tiny_store
    encoder, expected = encoder_and_reference
    out = tmp_path / "run" / "features.npz"
    result = extract_features(encoder, store, out=out, patches=True, device="cpu", progress=False)

    loaded = FeatureSet.load(out)
    assert loaded.subject_ids == result.subject_ids and loaded.metadata == result.metadata
    np.testing.assert_array_equal(loaded.features, result.features)
    assert loaded.metadata["patches"] == str((tmp_path / "run" / "features.patches.npy").resolve())
    patches = np.load(loaded.metadata["patches"], mmap_mode="r")
    assert patches.dtype == np.float16 and patches.shape == (3, atlas.num_landmarks, 16)
    np.testing.assert_allclose(patches, expected, rtol=2e-3, atol=2e-3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.npz", "features.patches.npy"]


def test_every_source_kind_is_detected_and_gives_the_same_features(tiny_store, tmp_path):
    atlas, store = tiny_store
    encoder = calibrated_encoder(store, atlas, seed=1)
    config = dict(encoder.config)
    # as Trainer._save and Trainer._save_encoder write them
    save_checkpoint({"encoder_q": encoder.state_dict(), "encoder_config": config,
                     "model": {"bank.keys": torch.randn(3, 3)}, "optimizer": {}, "scheduler": {},
                     "rng": {}, "position": {"step": 1, "epoch": 0, "batch": 1}, "config": {}},
                    tmp_path / "checkpoint_last.pt")
    save_checkpoint({"encoder_q": encoder.state_dict(), "encoder_config": config},
                    tmp_path / "encoder_epoch_0001.pt")
    torch.save(authors_layout(encoder), tmp_path / "checkpoint_0019.pth.tar")

    direct = extract_features(encoder, store, device="cpu", progress=False)
    assert direct.name == "DrasCLR" and direct.metadata["encoder"] == "Encoder object"
    # the authors' weights expect SimpleITK's (z, y, x) patches (docs/method.md#patch-axis-order)
    authors_axes = Encoder(**{**config, "patch_axes": "zyx"})
    authors_axes.load_state_dict(encoder.state_dict())
    transposed = extract_features(authors_axes.eval(), store, device="cpu", progress=False)
    assert not np.allclose(transposed.features, direct.features, rtol=1e-3, atol=1e-4)
    expected = {TRAINING_CHECKPOINT: direct, ENCODER_FILE: direct, AUTHORS_CHECKPOINT: transposed}
    for file, kind, name in (("checkpoint_last.pt", TRAINING_CHECKPOINT, "DrasCLR"),
                             ("encoder_epoch_0001.pt", ENCODER_FILE, "DrasCLR"),
                             ("checkpoint_0019.pth.tar", AUTHORS_CHECKPOINT, "DrasCLR (authors)")):
        loaded, detected = read_encoder_file(tmp_path / file)
        assert detected == kind and not loaded.training
        result = extract_features(tmp_path / file, store, device="cpu", progress=False)
        meta = result.metadata
        assert (meta["encoder"], result.name, meta["source"]) == (kind, name, str(tmp_path / file))
        assert meta["rep_dim"] == 16 and meta["device"] == "cpu" and meta["dtype"] == "float32"
        assert meta["store"] == str(store.root.resolve()) and meta["seconds"] > 0
        np.testing.assert_allclose(result.features, expected[kind].features, rtol=1e-5, atol=1e-6)
    assert extract_features(tmp_path / "encoder_epoch_0001.pt", store, name="mine",
                            progress=False).name == "mine"


def test_unknown_or_missing_checkpoints_are_named(tiny_store, tmp_path):
    _, store = tiny_store
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {"layer.weight": torch.ones(3)}}, tmp_path / "foreign.pth.tar")
    for file, message in (("other.pt", "not a drasclr training checkpoint, encoder file or "
                                       "authors' checkpoint"),
                          ("junk.pt", "not a readable torch checkpoint"),
                          ("foreign.pth.tar", "no query-encoder keys")):
        with pytest.raises(CheckpointError, match=f"{file}: .*{message}"):
            extract_features(tmp_path / file, store, progress=False)
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        extract_features(tmp_path / "missing.pt", store, progress=False)


def test_callers_encoder_is_neither_moved_nor_changed(tiny_store):
    atlas, store = tiny_store
    encoder = calibrated_encoder(store, atlas, seed=2).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extract_features(encoder, store, device=device, progress=False)
    extract_features(encoder, store, random_init=5, progress=False)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert encoder.backend == "grouped"
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # weights and BatchNorm statistics alike
        assert after[key].device.type == "cpu"
        assert torch.equal(after[key], value), key


def test_random_init_is_seeded_and_takes_the_source_architecture(tiny_store, tmp_path):
    atlas, store = tiny_store
    source = calibrated_encoder(store, atlas, seed=3)
    rng_state = torch.get_rng_state()
    first = extract_features(source, store, random_init=11, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream untouched
    again = extract_features(source, store, random_init=11, progress=False)
    other = extract_features(source, store, random_init=12, progress=False)
    trained = extract_features(source, store, progress=False)

    np.testing.assert_array_equal(first.features, again.features)
    assert np.abs(first.features - other.features).max() > 1e-2
    assert np.abs(first.features - trained.features).max() > 1e-2  # not the source's weights
    assert first.features.shape == (3, 16)  # the source's rep_dim
    assert first.name == "random init (seed 11)" and first.metadata["encoder"] == "random init"
    assert first.metadata["random_init"] == 11
    assert first.metadata["batchnorm"] == f"statistics estimated on {3 * atlas.num_landmarks} store patches"
    # calibrated statistics: h spreads over subjects instead of collapsing to one point
    assert first.features.std(axis=0).mean() > 0.05

    default = extract_features(None, store, random_init=11, progress=False)
    assert default.features.shape == (3, 128) and default.metadata["source"] is None


def test_bad_inputs_fail_before_any_work_naming_the_file(tiny_store, tmp_path):
    atlas, store = tiny_store
    encoder = Encoder(**SMALL)
    moved = tmp_path / "store"
    shutil.copytree(store.root, moved)
    record = json.loads((moved / "store.json").read_text())
    (moved / "store.json").write_text(json.dumps({**record, "atlas": str(tmp_path / "gone.npz")}))
    with pytest.raises(FileNotFoundError, match=r"store.json: the store's atlas .*gone.npz is gone"):
        extract_features(encoder, moved, progress=False)

    mask = np.zeros((70, 60, 60), np.uint8)
    mask[8:40, 8:40, 10:40] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "other_mask.nii.gz")
    other = build_atlas(tmp_path / "other_mask.nii.gz")
    assert other.num_landmarks != atlas.num_landmarks
    other.save(tmp_path / "other.npz")
    (moved / "store.json").write_text(json.dumps({**record, "atlas": str(tmp_path / "other.npz")}))
    with pytest.raises(ValueError, match=rf"other.npz \({other.num_landmarks} landmarks\) is not "
                                         rf"the one the store was cut with \(8 landmarks\)"):
        extract_features(encoder, moved, progress=False)

    create_store(tmp_path / "empty", atlas, store.config["atlas"])
    with pytest.raises(ValueError, match="empty/manifest.csv: the store has no finished subjects"):
        extract_features(encoder, tmp_path / "empty", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere: no such patch store folder"):
        extract_features(encoder, tmp_path / "nowhere", progress=False)
    for kwargs, message in (({"patches": True}, "give out"), ({"batch_size": 0}, "batch_size"),
                            ({"patch_dtype": "int8"}, "patch_dtype"),
                            ({"random_init": 1.5}, "random_init"),
                            ({"device": "tpu"}, "tpu")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            extract_features(encoder, store, progress=False, **kwargs)
    with pytest.raises(ValueError, match="random_init=SEED"):
        extract_features(None, store, progress=False)
    with pytest.raises(ValueError, match="expected a drasclr Encoder or a checkpoint path"):
        extract_features(torch.nn.Linear(3, 3), store, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_features_are_close_to_float64(tiny_store, encoder_and_reference, tmp_path):
    atlas, store = tiny_store
    encoder, expected = encoder_and_reference
    result = extract_features(encoder, store, out=tmp_path / "f.npz", patches=True,
                              device="cuda", progress=False)
    assert result.metadata["dtype"] == "bfloat16" and result.metadata["device"].startswith("cuda")
    scale = np.abs(expected).max()
    assert np.abs(result.features - expected.mean(axis=1)).max() < 3e-2 * scale
    patches = np.load(tmp_path / "f.patches.npy")
    assert np.abs(patches - expected).max() < 5e-2 * scale


def test_cli_writes_a_loadable_features_file(tiny_store, tmp_path, capsys):
    atlas, store = tiny_store
    encoder = calibrated_encoder(store, atlas, seed=4)
    save_checkpoint({"encoder_q": encoder.state_dict(), "encoder_config": dict(encoder.config)},
                    tmp_path / "encoder_epoch_0002.pt")
    out = tmp_path / "features.npz"
    assert cli_main(["features", "--checkpoint", str(tmp_path / "encoder_epoch_0002.pt"),
                     "--store", str(store.root), "--out", str(out), "--patches", "--batch", "8",
                     "--device", "cpu", "--name", "epoch 2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "features.patches.npy" in printed
    loaded = FeatureSet.load(out)
    assert loaded.name == "epoch 2" and loaded.features.shape == (3, 16)
    np.testing.assert_allclose(loaded.features,
                               extract_features(encoder, store, device="cpu",
                                                progress=False).features,
                               rtol=1e-4, atol=1e-5)  # other batches: other summation order

    baseline = tmp_path / "random.npz"
    assert cli_main(["features", "--random-init", "0", "--store", str(store.root), "--out",
                     str(baseline), "--no-progress"]) == 0
    assert FeatureSet.load(baseline).name == "random init (seed 0)"
    assert cli_main(["features", "--store", str(store.root), "--out", str(baseline)]) == 2
    assert "--random-init" in capsys.readouterr().err


def test_feature_set_round_trip_and_bad_files(tmp_path):
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
