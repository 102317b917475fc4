"""The patch store: layout, atomic writes, manifest rows, memory-mapped gather, clear errors."""
import csv
import json

import numpy as np
import pytest
from helpers import L, P, make_atlas, random_patches

from drasclr.data.store import PatchStore, create_store, patch_path, write_subject

@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    create_store(root, make_atlas(), tmp_path / "atlas.npz")
    return root


def test_write_and_read_back(store):
    rng = np.random.default_rng(1)
    written = {sid: random_patches(rng) for sid in ("s2", "s0", "s1")}
    for sid, patches in written.items():
        quality = {"dice": 0.97, "lung_volume_ml": 4200.5}
        write_subject(store, sid, f"/data/{sid}.nii.gz", patches, quality=quality, seconds=3.25)
    write_subject(store, "bad", "/data/bad.nii.gz", error="NaN voxels\nin slice 3")

    reader = PatchStore(store)
    assert reader.subject_ids == ["s2", "s0", "s1"]  # done rows, manifest order
    assert (reader.num_subjects, reader.num_landmarks, reader.patch_size) == (3, L, P)
    row = reader.manifest[0]
    assert (row["status"], row["dice"], row["lung_volume_ml"]) == ("done", 0.97, 4200.5)
    assert row["seconds"] == 3.25
    assert reader.manifest[3]["status"] == "failed"
    assert reader.manifest[3]["error"] == "NaN voxels in slice 3"
    assert reader.manifest[3]["dice"] is None

    mapped = reader.subject_patches(1)
    assert isinstance(mapped, np.memmap) and reader.subject_patches(1) is mapped
    np.testing.assert_array_equal(mapped, written["s0"])

    subjects = rng.integers(0, 3, size=50)
    landmarks = rng.integers(0, L, size=50)
    batch = reader.gather(subjects, landmarks)
    ids = reader.subject_ids
    expected = np.stack([written[ids[s]][l] for s, l in zip(subjects, landmarks)])
    assert batch.dtype == np.int16 and batch.shape == (50, P, P, P)
    np.testing.assert_array_equal(batch, expected)
    # Broadcasting: one subject, a neighbour table row.
    np.testing.assert_array_equal(reader.gather(2, [4, 0]), written["s1"][[4, 0]])
    with pytest.raises(IndexError, match="landmark index"):
        reader.gather([0], [L])
    with pytest.raises(IndexError, match="subject index"):
        reader.gather([3], [0])


def test_open_files_are_bounded(store):
    rng = np.random.default_rng(6)
    written = [random_patches(rng) for _ in range(4)]
    for number, patches in enumerate(written):
        write_subject(store, f"s{number}", "x.nii", patches)
    reader = PatchStore(store, max_open=2)
    first = reader.subject_patches(0)
    reader.subject_patches(1)
    assert reader.subject_patches(0) is first  # still open, now the most recent
    reader.subject_patches(2)  # closes subject 1, the least recently used
    assert reader.subject_patches(0) is first and len(reader._open) == 2
    batch = reader.gather(np.arange(4).repeat(L), np.tile(np.arange(L), 4))
    np.testing.assert_array_equal(batch, np.concatenate(written))
    assert len(reader._open) == 2
    with pytest.raises(ValueError, match="max_open"):
        PatchStore(store, max_open=0)


def test_rewrite_replaces_the_row_and_failure_removes_stale_patches(store):
    rng = np.random.default_rng(2)
    write_subject(store, "a", "a.nii", random_patches(rng), quality={"dice": 0.5})
    write_subject(store, "b", "b.nii", random_patches(rng))
    newer = random_patches(rng)
    write_subject(store, "a", "a2.nii", newer, quality={"dice": 0.9})
    reader = PatchStore(store)
    assert [r["subject_id"] for r in reader.manifest] == ["a", "b"]
    assert (reader.manifest[0]["source"], reader.manifest[0]["dice"]) == ("a2.nii", 0.9)
    np.testing.assert_array_equal(reader.subject_patches(0), newer)

    write_subject(store, "a", "a2.nii", error="registration Dice 0.42 below 0.9")
    assert not patch_path(store, "a").exists()
    assert PatchStore(store).subject_ids == ["b"]
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_create_store_is_idempotent_and_refuses_another_atlas(store, tmp_path):
    write_subject(store, "a", "a.nii", random_patches(np.random.default_rng(3)))
    create_store(store, make_atlas(), tmp_path / "atlas.npz")  # same atlas: nothing lost
    assert PatchStore(store).subject_ids == ["a"]
    with pytest.raises(ValueError, match="another atlas"):
        create_store(store, make_atlas(seed=1), tmp_path / "other.npz")
    config = json.loads((store / "store.json").read_text())
    assert (config["patch_size"], config["num_landmarks"], config["version"]) == (P, L, 1)


def test_write_subject_rejects_bad_arguments(store):
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="int16 of shape"):
        write_subject(store, "a", "a.nii", random_patches(rng).astype(np.float32))
    with pytest.raises(ValueError, match="int16 of shape"):
        write_subject(store, "a", "a.nii", random_patches(rng)[:3])
    with pytest.raises(ValueError, match="clash"):
        write_subject(store, "a", "a.nii", random_patches(rng), quality={"status": 1.0})
    with pytest.raises(ValueError, match="either patches"):
        write_subject(store, "a", "a.nii")
    with pytest.raises(ValueError, match="subject id"):
        write_subject(store, "../escape", "a.nii", random_patches(rng))
    assert PatchStore(store).manifest == []


def test_clear_errors_for_damaged_stores(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such patch store"):
        PatchStore(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no store.json"):
        PatchStore(tmp_path)

    rng = np.random.default_rng(5)
    write_subject(store, "a", "a.nii", random_patches(rng))
    np.save(patch_path(store, "a"), random_patches(rng)[:, :2])  # wrong shape behind our back
    with pytest.raises(ValueError, match="expected int16 patches of shape"):
        PatchStore(store, verify=False).subject_patches(0)  # the shape check, not the checksum
    data = random_patches(rng)
    np.save(patch_path(store, "a"), data)
    raw = patch_path(store, "a").read_bytes()
    patch_path(store, "a").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        PatchStore(store, verify=False).subject_patches(0)

    manifest = store / "manifest.csv"
    manifest.write_text("name,whatever\nx,y\n")
    with pytest.raises(ValueError, match="garbled manifest"):
        PatchStore(store)
    with open(manifest, "w", newline="") as file:
        csv.writer(file).writerows([["subject_id", "source", "status", "error", "seconds"],
                                    ["a", "a.nii", "done", "", "fast"]])
    with pytest.raises(ValueError, match="garbled manifest"):
        PatchStore(store)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="manifest missing"):
        PatchStore(store)
