"""The preprocessing pipeline: cohort discovery, sharding, failures, resuming, workers, CLI,
density measures added to a store made before them."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from drasclr.cli import main as cli_main
from drasclr.data.atlas import Atlas, build_atlas
from drasclr.data.density import DENSITY_MEASURES
from drasclr.data.preprocess import (
    SubjectSource,
    Task,
    failure_reason,
    find_subjects,
    parse_shard,
    plan_tasks,
    preprocess,
    select_shard,
)
from drasclr.data.store import PatchStore


def test_find_subjects_in_a_folder(tmp_path, monkeypatch):
    for name in ("b.nii.gz", "a.nii", "c.NRRD", "d.mha", "e.mhd", "e.raw", "notes.txt", ".hidden.nii"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "f_dicom").mkdir()
    (tmp_path / ".git").mkdir()
    subjects = find_subjects(tmp_path)
    assert [s.subject_id for s in subjects] == ["a", "b", "c", "d", "e", "f_dicom"]
    assert subjects[1].source == str(tmp_path / "b.nii.gz")
    assert subjects[5].source == str(tmp_path / "f_dicom")
    monkeypatch.chdir(tmp_path.parent)
    assert find_subjects(tmp_path.name) == subjects  # relative input, absolute sources


def test_find_subjects_in_a_csv(tmp_path):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"subject_id,path,age\nz9,scans/z.nii.gz,60\na1,{tmp_path}/abs.nrrd,70\n")
    subjects = find_subjects(cohort)
    assert subjects == [SubjectSource("a1", f"{tmp_path}/abs.nrrd"),
                        SubjectSource("z9", str(tmp_path / "scans" / "z.nii.gz"))]


@pytest.mark.parametrize("text, message", [
    ("id,file\na,b\n", "lacks the column"),
    ("subject_id,path\na,x.nii\na,y.nii\n", "more than once: a"),
    ("subject_id,path\n,x.nii\n", "line 2 has an empty"),
    ("subject_id,path\n", "no images found"),
    ("subject_id,path\n../up,x.nii\n", "subject id '../up'"),
])
def test_bad_cohort_lists_are_clear_errors(tmp_path, text, message):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(text)
    with pytest.raises(ValueError, match=message):
        find_subjects(cohort)


def test_missing_cohort_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder or CSV"):
        find_subjects(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no images found"):
        find_subjects(tmp_path)


def test_shards_split_the_sorted_cohort_deterministically():
    rng = np.random.default_rng(0)
    ids = [f"s{n:03d}" for n in rng.permutation(23)]
    subjects = [SubjectSource(i, f"{i}.nii") for i in ids]
    shards = [select_shard(subjects, f"{i}/4") for i in range(4)]
    assert sorted(s.subject_id for shard in shards for s in shard) == sorted(ids)  # a partition
    assert [len(shard) for shard in shards] == [6, 6, 6, 5]
    assert [s.subject_id for s in shards[1]] == sorted(ids)[1::4]
    reordered = [subjects[i] for i in rng.permutation(23)]
    assert select_shard(reordered, (1, 4)) == shards[1]  # input order does not matter
    assert select_shard(subjects, None) == subjects


@pytest.mark.parametrize("shard", ["4/4", "-1/2", "1", "a/b", "1/2/3", (2, 1)])
def test_bad_shards_are_clear_errors(shard):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(shard)


def test_bad_run_arguments_fail_before_any_work(tmp_path):
    for kwargs, message in (({"workers": 0}, "workers"), ({"schedule": "slow"}, "schedule"),
                            ({"segmentation": "magic"}, "segmentation")):
        with pytest.raises(ValueError, match=message):
            preprocess(tmp_path, tmp_path / "atlas.npz", tmp_path / "store", **kwargs)
    with pytest.raises(FileNotFoundError, match="no atlas file"):
        preprocess(tmp_path, tmp_path / "atlas.npz", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_failure_reasons_name_the_problem():
    assert failure_reason(ValueError("x.nii: not 3D")) == "x.nii: not 3D"
    assert failure_reason(RuntimeError("ITK exploded")) == "RuntimeError: ITK exploded"
    assert failure_reason(MemoryError()) == "MemoryError"


# --- End to end on the synthetic cohort, with the real per-subject processing -----------------

GOOD = ["good0", "good1"]
BAD = {  # subject id -> what its manifest error must say
    "bad_2d": "3D",
    "bad_air": "lung",
    "bad_missing": "no such file",
    "bad_nan": "NaN",
    "bad_truncated": "truncated",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two small synthetic subjects plus one of each kind of bad input, listed in a CSV."""
    from drasclr.data.synthetic import generate_cohort

    folder = tmp_path_factory.mktemp("preprocess")
    generate_cohort(folder / "synthetic", len(GOOD), seed=0, kind="copd", size="small", version=1)
    atlas_path = folder / "atlas.npz"
    build_atlas(folder / "synthetic" / "template" / "lung_mask.nii.gz").save(atlas_path)

    images = sorted((folder / "synthetic" / "images").glob("*.nii.gz"))
    bad = folder / "bad"
    bad.mkdir()
    raw = images[0].read_bytes()
    (bad / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    image = nib.load(str(images[0]))
    array = np.asarray(image.dataobj, dtype=np.float32)
    with_nan = array.copy()
    with_nan[::7, 3, :] = np.nan
    nib.save(nib.Nifti1Image(with_nan, image.affine), str(bad / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(array[:, :, array.shape[2] // 2], image.affine), str(bad / "flat.nii.gz"))
    air = np.full(array.shape, -1000, np.float32)
    nib.save(nib.Nifti1Image(air, image.affine), str(bad / "air.nii.gz"))

    sources = {
        "good0": images[0], "good1": images[1], "bad_2d": bad / "flat.nii.gz",
        "bad_air": bad / "air.nii.gz", "bad_missing": bad / "missing.nii.gz",
        "bad_nan": bad / "nan.nii.gz", "bad_truncated": bad / "truncated.nii.gz",
    }
    table = folder / "cohort.csv"
    table.write_text("subject_id,path\n" + "".join(f"{k},{v}\n" for k, v in sources.items()))
    return table, atlas_path


@pytest.fixture(scope="module")
def uninterrupted(cohort, tmp_path_factory):
    table, atlas_path = cohort
    out = tmp_path_factory.mktemp("store_a")
    summary = preprocess(table, atlas_path, out, progress=False)
    return out, summary


def manifest_without_timing(root):
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in PatchStore(root).manifest]


def test_bad_subjects_fail_with_reasons_and_good_ones_finish(uninterrupted, cohort):
    out, summary = uninterrupted
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (7, 2, 5, 0)
    store = PatchStore(out)
    assert store.subject_ids == GOOD
    rows = {row["subject_id"]: row for row in store.manifest}
    for subject_id, reason in BAD.items():
        assert rows[subject_id]["status"] == "failed"
        assert reason.lower() in rows[subject_id]["error"].lower(), rows[subject_id]["error"]
    atlas = Atlas.load(cohort[1])
    for index, subject_id in enumerate(GOOD):
        patches = store.subject_patches(index)
        assert patches.shape == (atlas.num_landmarks, 32, 32, 32) and patches.dtype == np.int16
        assert patches.min() >= -1024 and patches.std() > 50  # real CT content, not padding
        assert rows[subject_id]["dice"] > 0.9 and rows[subject_id]["seconds"] > 0
        assert any((out / "transforms" / subject_id).iterdir())


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_run_resumes_to_the_same_store(uninterrupted, cohort, tmp_path, signal_number):
    """Ctrl-C or a hard kill of the whole process group while the last subject runs, then a
    re-run. A hard kill may leave a temporary file behind, never a file that counts as done."""
    table, atlas_path = cohort
    out = tmp_path / "store"
    command = [sys.executable, "-m", "drasclr.cli", "preprocess", "--images", str(table),
               "--atlas", str(atlas_path), "--out", str(out), "--no-progress"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    manifest = out / "manifest.csv"
    while not (manifest.exists() and "good0" in manifest.read_text()):  # id order: good1 is next
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
        time.sleep(0.05)
    os.killpg(run.pid, signal_number)
    if signal_number == signal.SIGINT:
        assert run.wait(timeout=60) == 130
        assert "interrupted" in run.stderr.read()
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    else:
        assert run.wait(timeout=60) == -signal.SIGKILL
    assert PatchStore(out).subject_ids == ["good0"]

    summary = preprocess(table, atlas_path, out, workers=2, progress=False)
    assert (summary.skipped, summary.done, summary.failed) == (1, 1, 5)  # failed ones are retried
    reference, _ = uninterrupted
    assert manifest_without_timing(out) == manifest_without_timing(reference)
    for index in range(len(GOOD)):
        np.testing.assert_array_equal(PatchStore(out).subject_patches(index),
                                      PatchStore(reference).subject_patches(index))


def test_cli_runs_one_shard(cohort, tmp_path, capsys):
    table, atlas_path = cohort
    bad_only = tmp_path / "bad.csv"
    lines = [line for line in table.read_text().splitlines() if "good" not in line]
    bad_only.write_text("\n".join(lines) + "\n")
    args = ["preprocess", "--images", str(bad_only), "--atlas", str(atlas_path), "--out",
            str(tmp_path / "store"), "--workers", "2", "--shard", "1/2", "--no-progress"]
    assert cli_main(args) == 1  # some subjects failed: exit 1, the summary names the manifest
    out = capsys.readouterr().out
    assert "0 done, 2 failed" in out and f"reasons in {tmp_path / 'store' / 'manifest.csv'}" in out
    rows = PatchStore(tmp_path / "store").manifest
    assert [row["subject_id"] for row in rows] == ["bad_air", "bad_nan"]  # sorted ids 1 and 3 of 5

    args[-3:-1] = ["--shard", "2/2"]
    assert cli_main(args) == 2
    assert "shard" in capsys.readouterr().err


# --- Density measures for a store made before they existed ------------------------------------

OLD_COLUMNS = set(DENSITY_MEASURES) - {"lung_volume_ml"} | {"seconds_density"}


def make_old_store(reference, out, lung_volume_ml="123.5"):
    """A copy of ``reference`` as the pipeline wrote it before the density measures: no density
    columns, and lung_volume_ml from the 2 mm segmentation (here a marker value)."""
    shutil.copytree(reference, out)
    with open(out / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    columns = [c for c in rows[0] if c not in OLD_COLUMNS]
    with open(out / "manifest.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "lung_volume_ml": lung_volume_ml if row["status"] == "done" else ""})


def file_states(root):
    """Bytes and modification time of every patch and transform file."""
    return {path.relative_to(root): (path.read_bytes(), path.stat().st_mtime_ns)
            for folder in ("patches", "transforms") for path in sorted((root / folder).rglob("*"))
            if path.is_file()}


def test_rerun_adds_density_measures_without_redoing_patches(uninterrupted, cohort, tmp_path, capsys):
    reference, _ = uninterrupted
    table, atlas_path = cohort
    out = tmp_path / "old_store"
    make_old_store(reference, out)
    assert all(row.get("laa950_percent") is None for row in PatchStore(out).manifest)
    before = file_states(out)
    assert len(before) == 2 + 4  # two patch files, two transforms per good subject

    # exactly the arguments of the run that made the store (its bad subjects fail again: exit 1)
    assert cli_main(["preprocess", "--images", str(table), "--atlas", str(atlas_path), "--out",
                     str(out), "--no-progress"]) == 1
    assert "density measures added to 2 done subject(s)" in capsys.readouterr().out

    assert file_states(out) == before  # byte-identical, never rewritten
    fresh = {row["subject_id"]: row for row in PatchStore(reference).manifest}
    for row in PatchStore(out).manifest:
        if row["status"] != "done":
            continue
        assert row["error"] == "" and row["seconds_density"] > 0
        for name in DENSITY_MEASURES:  # the numbers a fresh run records (1 mm lung volume too)
            assert row[name] == fresh[row["subject_id"]][name], name
        assert row["dice"] == fresh[row["subject_id"]]["dice"]  # registration columns kept
    assert PatchStore(out).subject_ids == GOOD

    again = preprocess(table, atlas_path, out, progress=False)  # nothing left to add
    assert (again.skipped, again.density_added, again.done) == (2, 0, 0)


def test_density_tasks_are_planned_per_row_and_failures_keep_the_subject(uninterrupted, cohort,
                                                                         tmp_path):
    reference, _ = uninterrupted
    table, atlas_path = cohort
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    subjects = find_subjects(table)
    by_id = {s.subject_id: s for s in subjects}
    # as an interrupted re-run of an old store leaves it: good0 got its measures, good1 not yet
    with open(out / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        if row["subject_id"] == "good1":
            row["laa950_percent"] = ""
    with open(out / "manifest.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tasks = plan_tasks(out, subjects)
    assert Task(by_id["good1"], density_only=True) in tasks
    assert [t.subject.subject_id for t in tasks if not t.density_only] == sorted(BAD)
    assert not any(t.subject.subject_id == "good0" for t in tasks)

    # the scan of good1 has gone since: the subject stays done, with the reason in its row
    moved = tmp_path / "moved.csv"
    moved.write_text(table.read_text().replace(str(by_id["good1"].source), str(tmp_path / "gone.nii.gz")))
    before = file_states(out)
    summary = preprocess(moved, atlas_path, out, progress=False)
    assert (summary.density_added, summary.density_failed) == (0, 1)
    row = {r["subject_id"]: r for r in PatchStore(out).manifest}["good1"]
    assert row["status"] == "done" and row["laa950_percent"] is None
    assert row["error"].startswith("density measures not added:") and "gone.nii.gz" in row["error"]
    assert file_states(out) == before
    assert PatchStore(out).subject_ids == GOOD


def test_damaged_patch_file_of_a_done_subject_is_redone_and_reported(uninterrupted, cohort,
                                                                      tmp_path, capsys):
    """a re-run checks a done subject's file against its manifest checksum before
    skipping it; a changed byte makes it redo the subject and say so."""
    reference, _ = uninterrupted
    table, atlas_path = cohort
    good_only = tmp_path / "good.csv"
    good_only.write_text("\n".join(line for line in table.read_text().splitlines()
                                   if "bad_" not in line) + "\n")
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    damaged = out / "patches" / "good1.npy"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{damaged}: subject 'good1': patch file damaged"):
        PatchStore(out).subject_patches(1)  # training would refuse it

    assert cli_main(["preprocess", "--images", str(good_only), "--atlas", str(atlas_path),
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 done, 0 failed, 1 already done" in printed
    assert "1 done subject(s) had a damaged patch file and were redone: good1" in printed
    assert damaged.read_bytes() == (reference / "patches" / "good1.npy").read_bytes()
    assert manifest_without_timing(out) == manifest_without_timing(reference)


def test_mirrored_header_is_done_with_a_laterality_warning(uninterrupted, cohort, tmp_path):
    """the same scan with its x axis mirrored in the header is still processed (real
    patients can look like this), but its manifest row says why it needs a review."""
    reference, _ = uninterrupted
    for row in PatchStore(reference).manifest:
        if row["status"] == "done":
            assert row["warning"] == "" and row["right_to_left_volume"] > 1.0  # the heart's side
    table, atlas_path = cohort
    source = next(line.split(",")[1] for line in table.read_text().splitlines()
                  if line.startswith("good0,"))
    image = nib.load(source)
    mirrored_affine = image.affine.copy()
    mirrored_affine[0, :] *= -1  # world x negated: the header mirrors left and right
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), mirrored_affine), tmp_path / "m.nii.gz")
    listing = tmp_path / "mirrored.csv"
    listing.write_text(f"subject_id,path\nmirrored,{tmp_path / 'm.nii.gz'}\n")
    summary = preprocess(listing, atlas_path, tmp_path / "store", progress=False)
    assert (summary.done, summary.failed) == (1, 0)
    row = PatchStore(tmp_path / "store").manifest[0]
    assert row["right_to_left_volume"] < 0.95
    assert row["warning"].startswith("laterality: the lung on the image's right (larger RAS x) "
                                     f"is {row['right_to_left_volume']:.2f} times the volume")
