"""every loader refuses a corrupted file with a ValueError that names the
file and the problem (wrong shapes, missing keys, unknown config keys, non-finite values),
never a KeyError, TypeError or torch RuntimeError from deep inside."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from helpers import good_atlas

from drasclr.checkpoint_formats import CheckpointError, load_encoder
from drasclr.data.atlas import Atlas
from drasclr.features import FeatureSet
from drasclr.nn import Encoder
from drasclr.pretrain.checkpoints import RESUME_KEYS, load_checkpoint, save_checkpoint

# -- atlas files ---------------------------------------------------------------------------


def write_atlas_file(path, arrays, metadata):
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.array(json.dumps(metadata)), **arrays)
    path.write_bytes(buffer.getvalue())


def atlas_parts(atlas):
    arrays = dict(corners=atlas.corners, coords=atlas.coords, neighbours=atlas.neighbours,
                  mask=atlas.mask, affine=atlas.affine)
    metadata = dict(format="drasclr-atlas", version=1, patch_size=atlas.patch_size,
                    step=atlas.step, min_lung_fraction=atlas.min_lung_fraction,
                    source=atlas.source, image_source=None)
    return arrays, metadata


def nan_coord(a, m):
    a["coords"] = a["coords"].copy()
    a["coords"][2, 1] = np.nan


def inf_affine(a, m):
    a["affine"] = a["affine"].copy()
    a["affine"][0, 3] = np.inf


def swapped_coords(a, m):
    a["coords"] = a["coords"][::-1].copy()


ATLAS_DAMAGES = {
    "coords NaN": (nan_coord, "NaN or infinite coordinates"),
    "coords of other corners": (swapped_coords, "coords do not match the corners"),
    "coords one landmark short": (lambda a, m: a.update(coords=a["coords"][:-1]),
                                  r"coords: expected floats of the corners' shape"),
    "corners 2 columns": (lambda a, m: a.update(corners=a["corners"][:, :2]),
                          r"corners: expected \(L, 3\) integers"),
    "corners float": (lambda a, m: a.update(corners=a["corners"].astype(np.float64)),
                      r"corners: expected \(L, 3\) integers"),
    "no landmarks": (lambda a, m: a.update(corners=a["corners"][:0], coords=a["coords"][:0],
                                           neighbours=a["neighbours"][:0]),
                     "L >= 1"),
    "neighbour out of range": (lambda a, m: a.update(neighbours=a["neighbours"] + 5),
                               "neighbours: indices must name other landmarks"),
    "neighbour is itself": (lambda a, m: a.update(neighbours=np.arange(9)[:, None].repeat(2, 1)),
                            "neighbours: indices must name other landmarks"),
    "neighbours of fewer landmarks": (lambda a, m: a.update(neighbours=a["neighbours"][:4]),
                                      r"neighbours: expected \(9, K\) integers"),
    "mask 2-D": (lambda a, m: a.update(mask=a["mask"][0]), "mask: expected a 3-D array"),
    "affine 3x3": (lambda a, m: a.update(affine=np.eye(3)), r"affine: expected a finite \(4, 4\)"),
    "affine infinite": (inf_affine, r"affine: expected a finite \(4, 4\)"),
    "affine singular": (lambda a, m: a.update(affine=np.diag([1.0, 0.0, 1.0, 1.0])),
                        "affine: singular"),
    "patch size 0": (lambda a, m: m.update(patch_size=0), r"patch_size: expected an integer"),
    "step NaN": (lambda a, m: m.update(step=float("nan")), "step: expected an integer"),
    "threshold 2": (lambda a, m: m.update(min_lung_fraction=2.0), "min_lung_fraction: expected"),
    "metadata key missing": (lambda a, m: m.pop("step"), r"missing key\(s\) \['step'\]"),
    "metadata key unknown": (lambda a, m: m.update(spacing=1.0), r"unknown key\(s\) \['spacing'\]"),
    "array missing": (lambda a, m: a.pop("neighbours"), "not a drasclr atlas file"),
}


def test_good_atlas_round_trips(tmp_path):
    atlas = good_atlas()
    atlas.save(tmp_path / "atlas.npz")
    loaded = Atlas.load(tmp_path / "atlas.npz")
    np.testing.assert_array_equal(loaded.corners, atlas.corners)
    np.testing.assert_array_equal(loaded.neighbours, atlas.neighbours)


@pytest.mark.parametrize("damage", list(ATLAS_DAMAGES))
def test_inconsistent_atlas_is_refused_on_load(tmp_path, damage):
    arrays, metadata = atlas_parts(good_atlas())
    change, message = ATLAS_DAMAGES[damage]
    change(arrays, metadata)
    path = tmp_path / "atlas.npz"
    write_atlas_file(path, arrays, metadata)
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}"):
        Atlas.load(path)


# -- checkpoints and encoder files -------------------------------------------------------------

SMALL = dict(rep_dim=16, moco_dim=8, num_experts=2)


@pytest.fixture(scope="module")
def encoder_state():
    torch.manual_seed(0)
    encoder = Encoder(**SMALL)
    return {"encoder_q": encoder.state_dict(), "encoder_config": dict(encoder.config)}


def drop_key(state, key):
    state.pop(key)


def rename_weight(state, _):
    weights = dict(state["encoder_q"])
    weights["conv1.routing.wt"] = weights.pop("conv1.routing.weight")
    state["encoder_q"] = weights


def wrong_shape(state, _):
    weights = dict(state["encoder_q"])
    weights["conv4.weight"] = torch.zeros(2, 16, 128, 3, 3, 2)
    state["encoder_q"] = weights


def nan_weight(state, _):
    weights = dict(state["encoder_q"])
    weights["conv2.weight"] = weights["conv2.weight"].clone()
    weights["conv2.weight"][0, 0, 0, 0, 0, 0] = float("nan")
    state["encoder_q"] = weights


CHECKPOINT_DAMAGES = {
    "no encoder_q": (lambda s, _: drop_key(s, "encoder_q"), r"without \['encoder_q'\]"),
    "no encoder_config": (lambda s, _: drop_key(s, "encoder_config"),
                          r"without \['encoder_config'\]"),
    "unknown config key": (lambda s, _: s["encoder_config"].update(width=3),
                           r"encoder_config has unknown key\(s\) \['width'\]"),
    "bad config value": (lambda s, _: s["encoder_config"].update(num_experts=0),
                         "encoder_config .*num_experts"),
    "config not a mapping": (lambda s, _: s.update(encoder_config=[1, 2]),
                             "encoder_config is a list"),
    "renamed weight": (rename_weight, r"missing keys \['conv1.routing.weight'\].*unexpected keys "
                                      r"\['conv1.routing.wt'\]"),
    "wrong weight shape": (wrong_shape, r"wrong shapes \['conv4.weight \(2, 16, 128, 3, 3, 2\)"),
    "config disagrees with weights": (lambda s, _: s["encoder_config"].update(rep_dim=32),
                                      "wrong shapes"),
    "NaN weight": (nan_weight, r"NaN or infinity in \['conv2.weight'\]"),
    "weights not a dict": (lambda s, _: s.update(encoder_q=[1]), "encoder_q is a list"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, encoder_state, damage):
    state = {"encoder_q": dict(encoder_state["encoder_q"]),
             "encoder_config": dict(encoder_state["encoder_config"])}
    change, message = CHECKPOINT_DAMAGES[damage]
    change(state, None)
    path = save_checkpoint(state, tmp_path / "encoder_epoch_0001.pt")
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{message}"):
        load_encoder(path)


def test_good_checkpoint_loads_the_same_weights(tmp_path, encoder_state):
    path = save_checkpoint(encoder_state, tmp_path / "encoder_epoch_0001.pt")
    encoder = load_encoder(path, backend="loop")
    assert encoder.backend == "loop" and not encoder.training
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, encoder_state["encoder_q"][key], rtol=0, atol=0)


def test_resume_needs_the_whole_training_state(tmp_path, encoder_state):
    path = save_checkpoint(encoder_state, tmp_path / "checkpoint_last.pt")
    assert load_checkpoint(path)["encoder_config"] == encoder_state["encoder_config"]
    with pytest.raises(CheckpointError, match=rf"^{path}: pretraining checkpoint without \['model', "):
        load_checkpoint(path, required=RESUME_KEYS)


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable torch checkpoint"),
    (b"PK\x03\x04 not really a zip", "not a readable torch checkpoint"),
    ({"weights": torch.zeros(2)}, "not a drasclr training checkpoint, encoder file or authors'"),
    ({"format": "drasclr-features", "version": 1}, "not a drasclr checkpoint .format "
                                                   "'drasclr-features'"),
    ({"format": "drasclr-pretrain", "version": 7}, "checkpoint version 7, expected 1"),
    ([1, 2], "not a drasclr training checkpoint.* .found list."),
    ("absent", "no such checkpoint file"),
])
def test_every_failure_is_one_error_type_naming_the_file(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "absent":
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}") as caught:
        load_encoder(path)
    assert isinstance(caught.value, ValueError) and caught.value.path == path
    if content == "absent":  # resuming says the same
        with pytest.raises(CheckpointError, match=rf"^{path}: no such checkpoint file"):
            load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, encoder_state):
    path = save_checkpoint(encoder_state, tmp_path / "checkpoint_last.pt")
    path.write_bytes(path.read_bytes()[:5000])
    for load in (load_encoder, load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"^{path}: not a readable torch checkpoint"):
            load(path)


# -- feature files ---------------------------------------------------------------------------


def write_features(path, metadata=None, **arrays):
    header = {"format": "drasclr-features", "version": 1, "name": "x"} if metadata is None else metadata
    parts = {"subject_ids": np.array(["a", "b", "c"]),
             "features": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    parts.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.array(json.dumps(header)), **{k: v for k, v in parts.items()
                                                                if v is not None})
    path.write_bytes(buffer.getvalue())


FEATURE_DAMAGES = {
    "fewer rows than ids": (dict(features=np.ones((2, 4), np.float32)), "features of shape"),
    "1-D features": (dict(features=np.ones(3, np.float32)), "features of shape"),
    "NaN feature": (dict(features=np.array([[1, 2], [np.nan, 0], [0, 0]], np.float32)),
                    r"non-finite features for 1 subject\(s\): b"),
    "repeated id": (dict(subject_ids=np.array(["a", "a", "c"])), "occur more than once"),
    "no features array": (dict(features=None), "not a drasclr features file"),
    "no ids array": (dict(subject_ids=None), "not a drasclr features file"),
    "foreign header": ({"metadata": {"format": "other"}}, "not a drasclr features file"),
    "newer version": ({"metadata": {"format": "drasclr-features", "version": 9}},
                      "features file version 9"),
}


@pytest.mark.parametrize("damage", list(FEATURE_DAMAGES))
def test_damaged_features_file_is_refused(tmp_path, damage):
    arrays, message = FEATURE_DAMAGES[damage]
    arrays = dict(arrays)
    path = tmp_path / "features.npz"
    write_features(path, arrays.pop("metadata", None), **arrays)
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}"):
        FeatureSet.load(path)


def test_features_file_that_is_not_a_zip(tmp_path):
    path = tmp_path / "features.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"^{path}: not a drasclr features file"):
        FeatureSet.load(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=rf"^{path}: not a drasclr features file"):
        FeatureSet.load(path)
