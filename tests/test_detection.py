"""Emphysema subtype detection (Yu et al. 2023, Section 4.3): patches and atlas coordinates of
annotated points on a small synthetic cohort with known truth, the cache, subject-disjoint folds,
the linear probe and fine-tuning on planted signals, label efficiency, the CLI and every input
error."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import drasclr.evaluation.detection_patches as patches_module
from drasclr.data.atlas import build_atlas
from drasclr.data.io import read_ct
from drasclr.data.resample import resample_isotropic
from drasclr.data.store import write_subject
from drasclr.data.synthetic import generate_cohort, map_template_points
from drasclr.data.synthetic.transform import SubjectTransform
from drasclr.evaluation.detection import (
    FINETUNE_DRASCLR, METHODS, PROBE_DRASCLR, PROBE_RANDOM, DetectionConfig, FineTuneConfig,
    cross_validate_probe, encode_patches, evaluate_detection, fine_tune, fit_linear_probe,
    predict_proba, probe_weights, subject_folds, task_subset,
)
from drasclr.evaluation.detection_efficiency import (
    LabelEfficiency, label_efficiency, nested_subsets,
)
from drasclr.features import random_encoder
from drasclr.evaluation.detection_patches import DetectionPatches, detection_patches
from drasclr.evaluation.report import Score

SUBJECTS = 6  # sub0001 and sub0004 have centrilobular and paraseptal boxes, four are healthy


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """A small synthetic COPD cohort, its template as the atlas, and its patch store."""
    from drasclr.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("detection")
    generate_cohort(root / "cohort", SUBJECTS, seed=0, kind="copd", size="small", workers=1,
                    progress=False, version=1)
    atlas = build_atlas(root / "cohort" / "template" / "lung_mask.nii.gz")
    atlas.save(root / "atlas.npz")
    summary = preprocess(root / "cohort" / "images", root / "atlas.npz", root / "store",
                         workers=1, progress=False)
    assert summary.done == SUBJECTS
    return {"root": root, "cohort": root / "cohort", "store": root / "store", "atlas": atlas,
            "annotations": root / "cohort" / "annotations.csv"}


@pytest.fixture(scope="module")
def cohort_patches(cohort) -> DetectionPatches:
    return detection_patches(cohort["annotations"], cohort["store"],
                             cache_dir=cohort["root"] / "cache")


def write_annotations(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# -- patches and coordinates -----------------------------------------------------------------

def test_atlas_coordinate_matches_true_mapping(cohort, cohort_patches):
    """Each point's coordinate, from the saved (affine) registration, matches the coordinate of
    the true template point (the template is the atlas), within 3 mm."""
    data, atlas = cohort_patches, cohort["atlas"]
    assert len(data) > 40 and set(data.labels) == {"centrilobular", "paraseptal", "healthy"}
    mm_per_unit = atlas.corners.max(axis=0) / 2.0 * np.linalg.norm(atlas.affine[:3, :3], axis=0)
    for subject_id in np.unique(data.subject_ids):
        rows = data.subject_ids == subject_id
        truth = json.loads((cohort["cohort"] / "truth" / f"{subject_id}.json").read_text())
        transform = SubjectTransform.from_dict(truth)
        template_points = transform.subject_to_template(data.points_mm[rows])
        # the true template points are those the true template->subject mapping sends here
        np.testing.assert_allclose(map_template_points(truth, template_points),
                                   data.points_mm[rows], atol=1e-3)
        error_mm = np.linalg.norm((data.coords[rows] - atlas.coords_of_points(template_points))
                                  * mm_per_unit, axis=1)
        assert error_mm.max() < 3.0, (subject_id, error_mm.max())


def test_patch_is_the_scans_voxels_around_the_point(cohort, cohort_patches):
    data = cohort_patches
    for row in (0, len(data) // 2, len(data) - 1):
        subject_id = data.subject_ids[row]
        volume = resample_isotropic(read_ct(cohort["cohort"] / "images" / f"{subject_id}.nii.gz"))
        to_voxel = np.linalg.inv(volume.affine)
        voxel = to_voxel[:3, :3] @ data.points_mm[row] + to_voxel[:3, 3]
        corner = np.rint(voxel - 15.5).astype(int)
        assert np.all(np.abs(corner + 15.5 - voxel) <= 0.5)  # the point is the patch's centre
        assert np.all(corner >= 0) and np.all(corner + 32 <= volume.array.shape)
        expected = volume.array[corner[0]:corner[0] + 32, corner[1]:corner[1] + 32,
                                corner[2]:corner[2] + 32]
        expected = np.rint(np.clip(expected, -1024, 240)).astype(np.int16)
        np.testing.assert_array_equal(data.patches[row], expected)


def test_cache_reused_then_invalidated_when_annotations_change(cohort, tmp_path, monkeypatch):
    reads = []

    def counting_read_ct(path):
        reads.append(str(path))
        return read_ct(path)

    monkeypatch.setattr(patches_module, "read_ct", counting_read_ct)
    rows = [r for r in read_rows(cohort["annotations"])
            if r["subject_id"] in ("sub0000", "sub0001")]
    annotations = write_annotations(tmp_path / "annotations.csv", rows)
    first = detection_patches(annotations, cohort["store"], cache_dir=tmp_path / "cache")
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2  # one read per scan
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    second = detection_patches(annotations, cohort["store"], cache_dir=tmp_path / "cache")
    assert len(reads) == 2  # served from the cache
    np.testing.assert_array_equal(first.patches, second.patches)
    np.testing.assert_array_equal(first.coords, second.coords)
    write_annotations(annotations, rows[:-1])
    third = detection_patches(annotations, cohort["store"], cache_dir=tmp_path / "cache")
    assert len(reads) == 4 and len(third) == len(rows) - 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the stale cache is gone


# -- errors ----------------------------------------------------------------------------------

@pytest.fixture
def broken_store(cohort, tmp_path) -> Path:
    """A copy of the store (no patch files needed) in which sub0002 has lost its registration,
    sub0003 failed preprocessing and the scan of sub0005 has gone."""
    store = tmp_path / "store"
    shutil.copytree(cohort["store"], store, ignore=shutil.ignore_patterns("patches", "*cache*"))
    shutil.rmtree(store / "transforms" / "sub0002")
    (store / "patches").mkdir()
    write_subject(store, "sub0003", "scan.nii.gz", error="implausible lung volume")
    num_landmarks = cohort["atlas"].num_landmarks
    write_subject(store, "sub0005", str(tmp_path / "moved.nii.gz"),
                  np.zeros((num_landmarks, 32, 32, 32), np.int16))
    return store


def test_errors_name_the_file_line_and_problem(cohort, broken_store, tmp_path):
    base = read_rows(cohort["annotations"])
    row = next(r for r in base if r["subject_id"] == "sub0000")
    volume = resample_isotropic(read_ct(cohort["cohort"] / "images" / "sub0000.nii.gz"))
    corner_mm = volume.affine[:3, :3] @ np.array([2.0, 2.0, 2.0]) + volume.affine[:3, 3]
    cases = [
        ({**row, "label": "panlobular"}, "unknown label 'panlobular'"),
        ({**row, "x_mm": "abc"}, "must be numbers"),
        ({**row, "x_mm": "1000"}, "lies outside its scan"),
        ({**row, **dict(zip(("x_mm", "y_mm", "z_mm"), map(str, corner_mm)))},
         "from the lungs segmented in"),
        ({**row, "subject_id": "sub9999"}, "'sub9999' is not in the patch store"),
        ({**row, "subject_id": "sub0002"}, "no saved registration"),
        ({**row, "subject_id": "sub0003"}, "failed preprocessing"),
        ({**row, "subject_id": "sub0005"}, "cannot read its scan"),
    ]
    for bad, message in cases:
        path = write_annotations(tmp_path / "bad.csv", [row, bad])
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            detection_patches(path, broken_store, use_cache=False)
        text = str(caught.value)
        assert text.startswith(f"{path}, line 3: ") and message in text, text
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("subject_id,x_mm,y_mm,z_mm\nsub0000,0,0,0\n")
    with pytest.raises(ValueError, match=r"no_label.csv: missing column\(s\) label"):
        detection_patches(no_label, broken_store, use_cache=False)


# -- folds, probe, fine-tuning ---------------------------------------------------------------

def planted(subjects: int = 16, per_subject: int = 8, shift_hu: float = 150.0, seed: int = 0
            ) -> DetectionPatches:
    """Boxes whose mean intensity depends on the label: the first half of the subjects have
    centrilobular boxes (brighter), the rest healthy ones; random coordinates."""
    rng = np.random.default_rng(seed)
    n = subjects * per_subject
    subject_ids = np.repeat([f"s{i:02d}" for i in range(subjects)], per_subject)
    labels = np.where(np.arange(n) < n // 2, "centrilobular", "healthy")
    brighter = shift_hu * (labels != "healthy")[:, None, None, None]
    hu = -800 + 40 * rng.standard_normal((n, 32, 32, 32)) + brighter
    coords = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    points = rng.normal(size=(n, 3))
    return DetectionPatches(subject_ids, labels, points, points, coords,
                            np.rint(hu).astype(np.int16))


def test_folds_are_subject_disjoint_and_hold_both_classes():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), rng.integers(2, 6, 12))
    y = (groups % 3 == 0).astype(int)
    y[groups == 1] = rng.integers(0, 2, (groups == 1).sum())  # a subject with both classes
    y[np.flatnonzero(groups == 1)[:2]] = [0, 1]
    folds = subject_folds(y, groups, 5, seed=0)  # 5 subjects with the subtype: one per fold
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(y)))  # every box tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(y[test]) == {0, 1} and set(y[train]) == {0, 1}
    with pytest.raises(ValueError, match="at least 6 subjects with each class, found 5"):
        subject_folds(y, groups, 6, task="centrilobular vs healthy")


def test_linear_probe_learns_planted_signal_and_not_shuffled_labels():
    data = planted()
    h = encode_patches(random_encoder({}, 0), data.patches, data.coords)
    rows, y, groups = task_subset(data, "centrilobular")
    config = DetectionConfig(folds=4)
    folds = subject_folds(y, groups, 4)
    assert cross_validate_probe(h[rows], y, groups, folds, config).f1.mean > 0.9
    shuffled = np.random.default_rng(0).permutation(y)
    chance = cross_validate_probe(h[rows], shuffled, groups, subject_folds(shuffled, groups, 4),
                                  config)
    assert chance.f1.mean < 0.75
    # the saved head (scaler folded in) gives the pipeline's probabilities on raw h
    model = fit_linear_probe(h, y, groups)
    weight, bias = probe_weights(model)
    np.testing.assert_allclose(1 / (1 + np.exp(-(h @ weight + bias))),
                               model.predict_proba(h)[:, 1], atol=1e-6)


def test_fine_tuning_learns_planted_signal_deterministically():
    data = planted(subjects=10, per_subject=8, shift_hu=200.0)
    train = np.isin(data.subject_ids, ["s00", "s01", "s02", "s05", "s06", "s07"])
    y = (data.labels == "centrilobular").astype(int)
    config = FineTuneConfig(epochs=6, batch_size=16, lr=1e-3)  # 18 steps
    start = random_encoder({}, 0)
    model, head = fine_tune(start, data.patches[train], data.coords[train], y[train], config,
                            seed=0)
    p = predict_proba(model, head, data.patches[~train], data.coords[~train])
    assert ((p > 0.5) == y[~train]).mean() > 0.9
    # same seed, same weights; the starting encoder is left as it was
    short = FineTuneConfig(epochs=1, batch_size=8)
    runs = [fine_tune(start, data.patches[:16], data.coords[:16], y[:16] * 0 + (np.arange(16) % 2),
                      short, seed=3)[1].weight.detach() for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(start.state_dict(), random_encoder({}, 0).state_dict())


def test_evaluate_detection_table_layout():
    data = planted(subjects=6, per_subject=4)
    config = DetectionConfig(folds=2, finetune=FineTuneConfig(epochs=1, batch_size=8))
    result = evaluate_detection(data, random_encoder({}, 1), config, subtypes=["centrilobular"])
    table = result.section().tables[0]
    assert table.columns == ["Method", "centrilobular F1", "centrilobular precision",
                             "centrilobular recall"]
    assert [row[0] for row in table.rows] == list(METHODS)
    assert all(isinstance(c, Score) and len(c.values) == 2 for row in table.rows for c in row[1:])
    assert result.scores[PROBE_DRASCLR]["centrilobular"].f1.mean > 0.5
    assert result.counts["centrilobular"] == {"positive": 12, "healthy": 12, "subjects": 6}
    assert {PROBE_RANDOM, FINETUNE_DRASCLR} <= set(result.scores)


def test_label_efficiency_subsets_and_curve(tmp_path):
    y = np.array([0] * 30 + [1] * 10)
    subsets = nested_subsets(y, (0.1, 0.5, 1.0), seed=0)
    assert [len(s) for s in subsets] == [4, 20, 40]
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2])
    assert all(set(y[s]) == {0, 1} for s in subsets)

    data = planted(subjects=4, per_subject=4)
    config = DetectionConfig(folds=2, finetune=FineTuneConfig(epochs=1, batch_size=8))
    curve = label_efficiency(data, random_encoder({}, 1), "centrilobular", (0.5, 1.0), config)
    assert curve.fractions == (0.5, 1.0) and len(curve.drasclr) == 2
    assert all(len(s.f1.values) == 2 for s in curve.drasclr)
    png = curve.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = curve.section(png.name)
    assert len(section.tables[0].rows) == 3 and section.figures[0].path == Path("curve.png")

    def scores(f1):
        return type(curve.scratch)(Score.of([f1]), Score.of([f1]), Score.of([f1]))
    made = LabelEfficiency("paraseptal", (0.1, 0.2, 0.3), [scores(0.5), scores(0.8), scores(0.9)],
                           scores(0.75), 2)
    assert made.matching_fraction == 0.2
    never = LabelEfficiency("paraseptal", (0.1,), [scores(0.5)], scores(0.75), 2)
    assert never.matching_fraction is None


# -- the command -----------------------------------------------------------------------------

def test_detect_command_writes_table_and_heads(cohort, cohort_patches, tmp_path, capsys):
    from drasclr.cli import main
    from drasclr.evaluation.head import head_and_encoder
    from drasclr.pretrain.checkpoints import save_checkpoint

    encoder = random_encoder({}, 5)
    checkpoint = save_checkpoint({"encoder_q": encoder.state_dict(),
                                  "encoder_config": encoder.config}, tmp_path / "encoder.pt")
    out = tmp_path / "out"
    code = main(["detect", "--annotations", str(cohort["annotations"]), "--store",
                 str(cohort["store"]), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--folds", "2", "--probe-only", "--cache-dir", str(cohort["root"] / "cache"),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Linear probe DrasCLR |" in printed and "paraseptal F1" in printed
    summary = json.loads((out / "detection.json").read_text())
    assert len(summary["scores"][PROBE_DRASCLR]["centrilobular"]["f1"]) == 2
    head, head_encoder, meta = head_and_encoder(out / "head_paraseptal_probe.pt", checkpoint)
    assert meta["label"] == "paraseptal"
    # the head on the encoder's h gives the probe's probabilities: high for paraseptal boxes
    data = cohort_patches
    h = torch.from_numpy(encode_patches(head_encoder, data.patches, data.coords))
    p = head(h).detach().numpy()
    rows, y, _ = task_subset(data, "paraseptal")
    assert p[rows][y == 1].mean() > p[rows][y == 0].mean()
    assert main(["detect", "--annotations", str(cohort["annotations"]), "--store",
                 str(cohort["store"]), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--folds", "5", "--probe-only", "--cache-dir", str(cohort["root"] / "cache"),
                 "--no-progress"]) == 2
    assert "5 subject-disjoint folds need at least 5 subjects" in capsys.readouterr().err
