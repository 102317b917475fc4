"""Emphysema subtype detection (Yu et al. 2023, Section 4.3): patches and atlas coordinates of
annotated points on a small synthetic cohort with known truth, the cache, subject-disjoint folds,
the linear probe and fine-tuning on planted signals, label efficiency, the CLI and every input
error."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from dataclasses import replace

import numpy as np
import pytest
import torch

import drasclr.evaluation.detection as detection_module
import drasclr.evaluation.detection_patches as patches_module
from drasclr.data.atlas import build_atlas
from drasclr.data.io import read_ct
from drasclr.data.lung_segmentation import segment_lungs
from drasclr.data.registration import load_subject_to_atlas
from drasclr.data.resample import resample_isotropic
from drasclr.data.store import write_subject
from drasclr.data.synthetic import generate_cohort, map_template_points
from drasclr.data.synthetic.transform import SubjectTransform
from drasclr.evaluation.detection import (
    FINETUNE_DRASCLR, METHODS, PATCH_LAA950, PROBE_DRASCLR, PROBE_RANDOM, DetectionConfig,
    FineTuneConfig, cross_validate_probe, encode_patches, evaluate_detection, fine_tune,
    fit_linear_probe, fold_scores, predict_proba, probe_weights, subject_folds, task_subset,
)
from drasclr.evaluation.detection_voxels import box_features, box_fractions, box_samples
from drasclr.evaluation.detection_efficiency import (
    LabelEfficiency, label_efficiency, nested_subsets,
)
from drasclr.features import random_encoder
from drasclr.evaluation.densemap import labels_on_grid
from drasclr.evaluation.detection_patches import DetectionPatches, detection_patches
from drasclr.evaluation.head import SubtypeHead
from drasclr.evaluation.report import Score

SUBJECTS = 6  # sub0001 and sub0004 have centrilobular and paraseptal boxes, four are healthy
# A small encoder for the slow paths; without location conditioning, whose per-sample kernels
# cost several times more on a CPU (the coordinate path is tested with the patches and maps).
TINY = {"rep_dim": 8, "moco_dim": 4, "num_experts": 2, "conditioning": "none"}


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
        # the box's region: the patch of box voxel b is regions[b:b + 32]; b's coordinate is
        # its world point through the registration; the box's lung is the segmentation's
        padded = np.pad(np.rint(np.clip(volume.array, -1024, 240)).astype(np.int16), 32,
                        constant_values=-1024)
        low = corner - 16 + 32
        np.testing.assert_array_equal(data.regions[row], padded[low[0]:low[0] + 63,
                                                                low[1]:low[1] + 63,
                                                                low[2]:low[2] + 63])
        b = np.array([[0, 0, 0], [31, 5, 17], [16, 16, 16]])
        world = (corner + b) @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        to_atlas = load_subject_to_atlas(cohort["store"] / "transforms" / subject_id)
        expected_coords = cohort["atlas"].coords_of_points(
            world @ to_atlas[:3, :3].T + to_atlas[:3, 3])
        np.testing.assert_allclose(np.c_[b, np.ones(3)] @ data.box_coord_affine[row],
                                   expected_coords, atol=1e-5)
        lungs = segment_lungs(volume)
        lung = labels_on_grid(lungs.labels, lungs.affine, volume)
        np.testing.assert_array_equal(data.box_lung[row], lung[corner[0]:corner[0] + 32,
                                                              corner[1]:corner[1] + 32,
                                                              corner[2]:corner[2] + 32])
    assert 0.2 < data.box_lung.mean() < 1.0  # boxes on lung points, some reaching beyond it


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

def planted(subjects: int = 16, per_subject: int = 8, shift_hu: float = 150.0, seed: int = 0,
            boxes: bool = False) -> DetectionPatches:
    """Boxes whose mean intensity depends on the label: the first half of the subjects have
    centrilobular boxes (brighter), the rest healthy ones; random coordinates. ``boxes``: with
    the box arrays of the voxel rule (63^3 regions of the same kind, all lung, coordinates
    changing by 0.01 per voxel around the box's own)."""
    rng = np.random.default_rng(seed)
    n = subjects * per_subject
    subject_ids = np.repeat([f"s{i:02d}" for i in range(subjects)], per_subject)
    labels = np.where(np.arange(n) < n // 2, "centrilobular", "healthy")
    shift = shift_hu * (labels != "healthy")
    coords = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    points = rng.normal(size=(n, 3))
    if not boxes:
        hu = -800 + 40 * rng.standard_normal((n, 32, 32, 32)) + shift[:, None, None, None]
        return DetectionPatches(subject_ids, labels, points, points, coords,
                                np.rint(hu).astype(np.int16))
    regions = np.stack([np.rint(-800 + s + 40 * rng.standard_normal((63, 63, 63)))
                        .astype(np.int16) for s in shift])
    affine = np.concatenate([np.broadcast_to(0.01 * np.eye(3), (n, 3, 3)),
                             (coords - 0.01 * 15.5)[:, None]], axis=1)
    return DetectionPatches(subject_ids, labels, points, points, coords,
                            np.ascontiguousarray(regions[:, 16:48, 16:48, 16:48]), regions,
                            np.ones((n, 32, 32, 32), bool), affine)


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


def test_fine_tuning_progress_bar_counts_the_optimisation_steps(monkeypatch):
    """The bar's total is the number of steps taken: a last batch of one sample is dropped."""
    from drasclr.evaluation import detection_models

    bars = []

    def recording_tqdm(iterable, **kwargs):
        bars.append({**kwargs, "steps": 0})
        for item in iterable:
            bars[-1]["steps"] += 1
            yield item

    monkeypatch.setattr(detection_models, "tqdm", recording_tqdm)
    data = planted(subjects=3, per_subject=6, shift_hu=200.0)
    y = np.arange(len(data)) % 2
    start = random_encoder(TINY, 0)
    for boxes, config in ((18, FineTuneConfig(epochs=2, batch_size=8)),  # 8 + 8 + 2 per pass
                          (17, FineTuneConfig(epochs=2, batch_size=8)),  # 8 + 8 (+ 1 dropped)
                          (18, FineTuneConfig(steps=5, batch_size=8))):
        fine_tune(start, data.patches[:boxes], data.coords[:boxes], y[:boxes], config,
                  label="paraseptal", progress=boxes == 17)
    assert [(bar["total"], bar["steps"]) for bar in bars] == [(6, 6), (4, 4), (5, 5)]
    assert [bar["disable"] for bar in bars] == [True, False, True]
    assert bars[0]["desc"] == "fine-tune (paraseptal)"


def test_evaluate_detection_table_layout():
    data = planted(subjects=6, per_subject=4, boxes=True)
    config = DetectionConfig(folds=2, finetune=FineTuneConfig(epochs=1, batch_size=8),
                             box_step=31)
    result = evaluate_detection(data, random_encoder(TINY, 1), config, subtypes=["centrilobular"])
    table = result.section().tables[0]
    assert table.columns == ["Method", "centrilobular F1", "centrilobular precision",
                             "centrilobular recall", "centrilobular centre-patch F1"]
    assert [row[0] for row in table.rows] == list(METHODS)
    for row in table.rows:
        cells = row[1:] if row[0] != PATCH_LAA950 else row[1:4]  # density: no centre column
        assert all(isinstance(c, Score) and len(c.values) == 2 for c in cells)
    assert table.rows[-1][4] == ""
    assert "25% of its lung voxels" in table.note
    assert "calling every box a lesion scores F1 0.67" in table.note  # 12 boxes vs 12 healthy
    assert result.scores[PROBE_DRASCLR]["centrilobular"].f1.mean > 0.5
    assert result.counts["centrilobular"] == {"positive": 12, "healthy": 12, "subjects": 6}
    assert {PROBE_RANDOM, FINETUNE_DRASCLR} <= set(result.scores)


def test_label_efficiency_subsets_and_curve(tmp_path, monkeypatch):
    y = np.array([0] * 30 + [1] * 10)
    subsets = nested_subsets(y, (0.1, 0.5, 1.0), seed=0)
    assert [len(s) for s in subsets] == [4, 20, 40]
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2])
    assert all(set(y[s]) == {0, 1} for s in subsets)

    # every run (each fraction and scratch) takes the steps of 2 epochs of the full part
    data = planted(subjects=4, per_subject=4)
    config = DetectionConfig(folds=2, finetune=FineTuneConfig(epochs=2, batch_size=4),
                             rule="centre")
    steps_taken, original_step = [], torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps_taken[-1][1] += 1
        return original_step(self, *args, **kwargs)

    def recording_fine_tune(encoder, patches, coords, y, *args, **kwargs):
        steps_taken.append([len(y), 0])
        return fine_tune(encoder, patches, coords, y, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(detection_module, "fine_tune", recording_fine_tune)
    curve = label_efficiency(data, random_encoder(TINY, 1), "centrilobular", (0.5, 1.0), config,
                             repeats=2)
    assert curve.fractions == (0.5, 1.0) and len(curve.drasclr) == 2
    assert all(len(s.f1.values) == 4 for s in curve.drasclr)  # 2 folds x 2 repeats
    assert len(steps_taken) == 12 and curve.steps == 4  # 2 epochs of 8 boxes in batches of 4
    assert {boxes for boxes, _ in steps_taken} == {4, 8}  # half and all of a training part
    assert all(steps == curve.steps for _, steps in steps_taken)
    png = curve.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = curve.section(png.name)
    assert len(section.tables[0].rows) == 3 and section.figures[0].path == Path("curve.png")
    _, y, _ = task_subset(data, "centrilobular")
    assert curve.all_lesion_f1 == pytest.approx(2 * y.sum() / (y.sum() + len(y)))
    assert f"Calling every box a lesion scores F1 {curve.all_lesion_f1:.2f}." in section.tables[0].note

    def scores(f1):
        return type(curve.scratch)(Score.of([f1]), Score.of([f1]), Score.of([f1]))
    made = LabelEfficiency("paraseptal", (0.1, 0.2, 0.3), [scores(0.5), scores(0.8), scores(0.9)],
                           scores(0.75), 2)
    assert made.matching_fraction == 0.2
    dips = LabelEfficiency("paraseptal", (0.1, 0.2, 0.3), [scores(0.5), scores(0.8), scores(0.7)],
                           scores(0.75), 2)
    assert dips.matching_fraction is None  # reached at 20 %, lost again at 30 %
    assert "not match scratch-with-everything from any fraction" in dips.section().tables[0].note
    assert "0.70 with 30 % against 0.75" in dips.section().tables[0].note
    never = LabelEfficiency("paraseptal", (0.1,), [scores(0.5)], scores(0.75), 2)
    assert never.matching_fraction is None


# -- the paper's voxel rule and the density control -------------------------------------------

class CentreVoxel(torch.nn.Module):
    """h = the network input at the patch's centre voxel (box voxel b's patch centres on b)."""

    rep_dim = 1

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return x[:, :, 16, 16, 16]


def subpleural_box(lesion_from: int = 26) -> DetectionPatches:
    """One box whose first half (x < 16) is chest wall (40 HU, no lung) and whose lung half is
    -850 HU with an emphysema slab (-990 HU) at x >= ``lesion_from``, away from the centre."""
    region = np.full((63, 63, 63), -850, np.int16)
    region[:32] = 40  # box voxel x = region index - 16: the wall is x < 16
    region[16 + lesion_from:48] = -990
    lung = np.zeros((1, 32, 32, 32), bool)
    lung[0, 16:] = True
    return DetectionPatches(np.array(["s"]), np.array(["paraseptal"]), np.zeros((1, 3)),
                            np.zeros((1, 3)), np.zeros((1, 3), np.float32),
                            region[None, 16:48, 16:48, 16:48].copy(), region[None], lung,
                            np.zeros((1, 4, 3)))


def test_voxel_rule_detects_a_subpleural_box_the_centre_misses():
    data = subpleural_box()
    head = SubtypeHead(1)
    with torch.no_grad():  # p > 0.5 where the centre voxel is below about -930 HU
        head.weight.fill_(-20.0)
        head.bias.fill_(-17.0)
    h = box_features(CentreVoxel(), data, np.array([0]), step=4)
    assert h.shape == (1, len(box_samples(4)), 1) and len(box_samples(4)) == 9 ** 3
    box_p = head(torch.from_numpy(h)).detach().numpy()
    centre_p = head(torch.from_numpy(encode_patches(CentreVoxel(), data.patches, data.coords)))
    lung_fraction = box_fractions(box_p, data.box_lung, 4)[0]
    # exact at step 1 the slab is 6 of 16 lung columns; interpolated from every 4th voxel the
    # values above 0.5 start at x = 27: 5 of 16
    assert lung_fraction == pytest.approx(5 / 16)
    scores = fold_scores(np.array([1]), centre_p.detach().numpy(), box_p, data.box_lung, 4)
    assert scores["recall"] == 1.0 and scores["centre_f1"] == 0.0
    # counted over all the box's voxels (the wall as 0) the same map would miss it
    assert box_fractions(box_p, np.ones_like(data.box_lung), 4)[0] == pytest.approx(5 / 32)
    # a smaller slab falls below 25 % of the lung voxels
    small = subpleural_box(lesion_from=29)
    small_p = head(torch.from_numpy(box_features(CentreVoxel(), small, np.array([0]), step=4)))
    assert box_fractions(small_p.detach().numpy(), small.box_lung, 4)[0] < 0.25


def test_box_features_are_the_encoder_on_each_sample_voxels_patch_and_coordinate(monkeypatch):
    from drasclr import precision
    from drasclr.intensity import normalise_hu

    data = planted(subjects=2, per_subject=1, boxes=True,
                   seed=int(np.random.default_rng().integers(1 << 30)))
    # a ramp of -120 to +1,360 HU across the region, so that every sample voxel's patch differs
    ramp = np.tensordot([4, 8, 12], np.indices((63,) * 3), axes=1) - 120
    data.regions[:] += ramp.astype(np.int16)
    encoder = random_encoder({**TINY, "conditioning": "loc_condconv"}, 3)
    encoder64 = random_encoder({**TINY, "conditioning": "loc_condconv"}, 3).double().eval()

    @torch.no_grad()
    def reference_h(n: int, i: int, j: int, k: int) -> np.ndarray:
        """h of the patch whose corner is box voxel (i, j, k), at that voxel's coordinate."""
        patch = normalise_hu(torch.from_numpy(data.regions[n, i:i + 32, j:j + 32, k:k + 32]))
        coord = torch.from_numpy(np.r_[i, j, k, 1.0] @ data.box_coord_affine[n])
        return encoder64(patch.double()[None, None], coord[None])[0].numpy()

    reference = np.array([[reference_h(1, *voxel) for voxel in box_samples(16)]])
    tolerance = 1e-4 * np.ptp(reference, axis=1).max()  # of the spread across sample voxels
    fp32 = box_features(encoder, data, np.array([1]), 16, amp=False, progress=False)
    np.testing.assert_allclose(fp32, reference, atol=tolerance)
    # by default the dense maps' arithmetic: bf16 on a CPU with native bf16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv(precision.CPU_BF16_VARIABLE, raising=False)
    error = np.abs(box_features(encoder, data, np.array([1]), 16, progress=False)
                   - reference).max()
    assert 10 * tolerance < error < 2e-2 * np.abs(reference).max()  # bf16 rounding


def test_voxel_rule_learns_planted_signal_and_not_shuffled_labels():
    data = planted(subjects=8, per_subject=4, boxes=True)
    encoder = random_encoder(TINY, 0)
    config = DetectionConfig(folds=4, box_step=31)
    h = encode_patches(encoder, data.patches, data.coords)
    box_h = box_features(encoder, data, np.arange(len(data)), config.box_step)
    rows, y, groups = task_subset(data, "centrilobular")
    real = cross_validate_probe(h[rows], y, groups, subject_folds(y, groups, 4), config,
                                box_h[rows], data.box_lung[rows])
    assert real.f1.mean > 0.9 and real.centre_f1.mean > 0.9
    shuffled = np.random.default_rng().permutation(y)
    chance = cross_validate_probe(h[rows], shuffled, groups, subject_folds(shuffled, groups, 4),
                                  config, box_h[rows], data.box_lung[rows])
    assert chance.f1.mean < 0.75


def test_patch_laa950_separates_low_density_boxes_and_not_shuffled_labels():
    rng = np.random.default_rng()
    data = planted(subjects=8, per_subject=4, shift_hu=0.0, boxes=True)
    positive = data.labels == "centrilobular"
    data.regions[positive, 16:48, 16:48, 24:48] -= 180  # a quarter of the lung far below -950
    data.patches[:] = data.regions[:, 16:48, 16:48, 16:48]
    data.box_lung[:, :4] = False  # voxels outside the lung do not count
    config = DetectionConfig(folds=4)
    result = evaluate_detection(data, random_encoder(TINY, 0), config, ["centrilobular"],
                                [PATCH_LAA950])
    assert result.scores[PATCH_LAA950]["centrilobular"].f1.mean > 0.95
    shuffled = replace(data, labels=rng.permutation(data.labels))
    chance = evaluate_detection(shuffled, random_encoder(TINY, 0), config, ["centrilobular"],
                                [PATCH_LAA950])
    assert chance.scores[PATCH_LAA950]["centrilobular"].f1.mean < 0.75


# -- the command -----------------------------------------------------------------------------

def test_detect_command_writes_table_and_heads(cohort, cohort_patches, tmp_path, capsys):
    from drasclr.cli import main
    from drasclr.evaluation.head import head_and_encoder
    from drasclr.pretrain.checkpoints import save_checkpoint

    encoder = random_encoder(TINY, 5)
    checkpoint = save_checkpoint({"encoder_q": encoder.state_dict(),
                                  "encoder_config": encoder.config}, tmp_path / "encoder.pt")
    out = tmp_path / "out"
    code = main(["detect", "--annotations", str(cohort["annotations"]), "--store",
                 str(cohort["store"]), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--folds", "2", "--probe-only", "--cache-dir", str(cohort["root"] / "cache"),
                 "--box-step", "31", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Linear probe DrasCLR |" in printed and "paraseptal F1" in printed
    assert "| Patch LAA-950 (density control) |" in printed
    summary = json.loads((out / "detection.json").read_text())
    assert len(summary["scores"][PROBE_DRASCLR]["centrilobular"]["f1"]) == 2
    assert len(summary["scores"][PROBE_DRASCLR]["centrilobular"]["centre_f1"]) == 2
    head, head_encoder, meta = head_and_encoder(out / "head_paraseptal_probe.pt", checkpoint)
    assert meta["label"] == "paraseptal"
    rows, _, groups = task_subset(cohort_patches, "paraseptal")
    assert meta["training_subjects"] == tuple(sorted(set(groups)))
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
