"""a patch file whose bytes changed after it was written is found by its
manifest checksum, once per subject when the store first opens it, and refused naming the
subject and the file; values outside the stored HU window are refused at write time."""
import csv
import warnings

import numpy as np
import pytest

from drasclr.data.store import PatchStore, create_store, patch_path, write_subject
from helpers import L, P, make_atlas, random_patches


@pytest.fixture
def store(tmp_path):
    """Three subjects written with their checksums."""
    root = tmp_path / "store"
    create_store(root, make_atlas(), tmp_path / "atlas.npz")
    rng = np.random.default_rng(11)
    for subject_id in ("a", "b", "c"):
        write_subject(root, subject_id, f"{subject_id}.nii", random_patches(rng))
    return root


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate_and_pad(path):
    """A partial copy padded back to full length: same size, so only the checksum sees it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))


def swap_with_other(path):
    """A stray write: another subject's valid patch file under this name."""
    other = path.with_name("b.npy") if path.stem != "b" else path.with_name("a.npy")
    path.write_bytes(other.read_bytes())


DAMAGES = {
    "bit flip in the data": lambda path: flip_byte(path, -5),
    "bit flip in the first patch": lambda path: flip_byte(path, 200),
    "partial copy padded": truncate_and_pad,
    "another subject's file": swap_with_other,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file_is_refused_naming_subject_and_file(store, damage):
    path = patch_path(store, "a")
    DAMAGES[damage](path)
    patches = PatchStore(store)
    with pytest.raises(ValueError, match=rf"{path}: subject 'a': patch file damaged"):
        patches.subject_patches(0)
    with pytest.raises(ValueError, match="subject 'a'"):
        patches.gather([0, 1], [0, 0])  # the read path reaches the same check
    np.testing.assert_array_equal(patches.subject_patches(1), np.load(patch_path(store, "b")))


def test_checksum_is_recorded_and_verified_once_per_subject(store, monkeypatch):
    with open(store / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert all(len(row["checksum"]) == 8 for row in rows)
    import drasclr.data.store as store_module

    calls = []
    original = store_module.verify_patch_file
    monkeypatch.setattr(store_module, "verify_patch_file",
                        lambda *args: (calls.append(args[1]), original(*args)))
    patches = PatchStore(store, max_open=1)  # every read re-maps a file, none re-verifies
    rng = np.random.default_rng(0)
    for _ in range(20):
        patches.gather(rng.integers(0, 3, 8), rng.integers(0, L, 8))
    assert sorted(calls) == ["a", "b", "c"]
    # a file damaged after its first (good) check is not re-read on the hot path by design;
    # a new PatchStore (the next run, a DataLoader worker) checks it again
    flip_byte(patch_path(store, "c"), -1)
    with pytest.raises(ValueError, match="subject 'c'"):
        PatchStore(store).subject_patches(2)


def test_store_without_checksums_still_opens_and_says_so_once(store):
    with open(store / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    with open(store / "manifest.csv", "w", newline="") as file:
        columns = [c for c in rows[0] if c not in ("checksum", "warning")]
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    flip_byte(patch_path(store, "a"), -5)  # cannot be seen without a checksum
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patches = PatchStore(store)
        for index in range(3):
            patches.subject_patches(index)
    assert len(caught) == 1 and "written before patch checksums" in str(caught[0].message)


@pytest.mark.parametrize("low,high", [(-1025, 0), (-1024, 241), (-3000, 3000), (-32768, -1024)])
def test_values_outside_the_hu_window_are_refused_at_write(store, low, high):
    patches = np.random.default_rng(2).integers(-1024, 241, size=(L, P, P, P), dtype=np.int16)
    patches[1, 0, 0, 0], patches[3, 1, 1, 1] = low, high
    span = rf"\[{patches.min()}, {patches.max()}\]"
    with pytest.raises(ValueError, match=rf"d: patch values span {span} HU, outside "
                                         r"the stored window \[-1024, 240\]"):
        write_subject(store, "d", "d.nii", patches)
    assert not patch_path(store, "d").exists()
    assert "d" not in PatchStore(store).subject_ids


def test_training_refuses_a_damaged_store_before_any_step(tmp_path):
    import drasclr
    from benchmarks.kill_test import TRAIN_SETTINGS, make_train_inputs

    store, atlas = make_train_inputs(tmp_path)
    flip_byte(patch_path(store, "s02"), -7)
    settings = {**TRAIN_SETTINGS, "num_workers": 0}
    with pytest.raises(ValueError, match=rf"{patch_path(store, 's02')}: subject 's02': patch "
                                         "file damaged"):
        drasclr.train(store=str(store), atlas=str(atlas), out_dir=str(tmp_path / "run"),
                      **settings)
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
