"""Old spellings keep working with a DeprecationWarning: TrainConfig keys (files and
checkpoints) and the atlas file's array name."""
import zipfile

import numpy as np
import pytest
from helpers import TINY, make_store

import drasclr
from drasclr.data.atlas import Atlas
from drasclr.pretrain.checkpoints import LAST, load_checkpoint, save_checkpoint
from drasclr.pretrain.config import TrainConfig


def test_old_config_key_is_renamed_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="'k_neighbors' is deprecated, use 'k_neighbours'"):
        assert TrainConfig.from_dict({"k_neighbors": 1}).k_neighbours == 1
    (tmp_path / "old.yaml").write_text("k_neighbors: 3\nlr: 0.05\n")
    with pytest.warns(DeprecationWarning, match="old.yaml"):
        config = TrainConfig.load(tmp_path / "old.yaml")
    assert (config.k_neighbours, config.lr) == (3, 0.05)
    with pytest.raises(ValueError, match="both 'k_neighbors' and its new spelling 'k_neighbours'"):
        TrainConfig.from_dict({"k_neighbors": 1, "k_neighbours": 2})


def test_ablation_train_block_knows_the_old_key():
    from drasclr.evaluation.ablation import AblationConfig

    with pytest.warns(DeprecationWarning, match="train: 'k_neighbors' is deprecated"):
        with pytest.raises(ValueError, match=r"train: \['k_neighbours'\] are set by the ablation"):
            AblationConfig("s", "a", "c.csv", "out", train={"k_neighbors": 1})


def test_atlas_file_with_the_old_array_name_loads(tmp_path):
    store, atlas_path = make_store(tmp_path, num_subjects=1)
    atlas = Atlas.load(atlas_path)
    old = tmp_path / "old_atlas.npz"
    with zipfile.ZipFile(atlas_path) as new_file, zipfile.ZipFile(old, "w") as old_file:
        for name in new_file.namelist():  # the same file as drasclr 0.1 wrote it
            old_file.writestr(name.replace("neighbours", "neighbors"), new_file.read(name))
    assert "neighbors" in np.load(old).files
    with pytest.warns(DeprecationWarning, match="'neighbors' is deprecated"):
        loaded = Atlas.load(old)
    np.testing.assert_array_equal(loaded.neighbours, atlas.neighbours)
    np.testing.assert_array_equal(loaded.corners, atlas.corners)


def test_checkpoint_with_the_old_config_key_resumes(tmp_path):
    store, atlas = make_store(tmp_path / "data", num_subjects=2)
    settings = dict(store=str(store), atlas=str(atlas), out_dir=str(tmp_path / "run"), **TINY,
                    k_neighbours=1)
    drasclr.train(max_steps=1, **settings)
    path = tmp_path / "run" / LAST
    state = load_checkpoint(path)
    state["config"]["k_neighbors"] = state["config"].pop("k_neighbours")  # as drasclr 0.1 wrote it
    save_checkpoint(state, path)
    with pytest.warns(DeprecationWarning, match="'k_neighbors' is deprecated"):
        resumed = drasclr.train(max_steps=2, **settings)
    assert [row["step"] for row in resumed.history][-1] == 2
