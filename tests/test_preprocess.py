"""The preprocessing pipeline: cohort discovery, sharding, failures, resuming, workers, CLI."""
import numpy as np
import pytest

from drasclr.data.preprocess import (
    SubjectSource,
    failure_reason,
    find_subjects,
    parse_shard,
    select_shard,
)


def test_find_subjects_in_a_folder(tmp_path):
    for name in ("b.nii.gz", "a.nii", "c.NRRD", "d.mha", "e.mhd", "e.raw", "notes.txt", ".hidden.nii"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "f_dicom").mkdir()
    (tmp_path / ".git").mkdir()
    subjects = find_subjects(tmp_path)
    assert [s.subject_id for s in subjects] == ["a", "b", "c", "d", "e", "f_dicom"]
    assert subjects[1].source == str(tmp_path / "b.nii.gz")
    assert subjects[5].source == str(tmp_path / "f_dicom")


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


def test_failure_reasons_name_the_problem():
    assert failure_reason(ValueError("x.nii: not 3D")) == "x.nii: not 3D"
    assert failure_reason(RuntimeError("ITK exploded")) == "RuntimeError: ITK exploded"
    assert failure_reason(MemoryError()) == "MemoryError"
