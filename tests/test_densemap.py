"""Dense voxel maps (drasclr.evaluation.densemap, drasclr densemap): exactness against a float64
reference, step-S maps, geometry of the written map, the detection rule, scores against the
truth, resuming, fast mode's dilation trick, head files and every error.

Forward passes of the real encoder cost ~0.1 s each on one CPU thread, so real-encoder tests
use a few dozen voxels; geometry and resume tests use a cheap stub encoder."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from drasclr.data.atlas import build_atlas
from drasclr.data.preprocess import preprocess
from drasclr.data.synthetic import generate_cohort
from drasclr.evaluation import densemap as dm
from drasclr.evaluation.head import (SubtypeHead, check_head_matches, head_and_encoder, load_head,
                                     save_head)
from drasclr.nn import Encoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """One small synthetic subject, preprocessed into a store with its registration."""
    root = tmp_path_factory.mktemp("densemap")
    generate_cohort(root / "cohort", 1, seed=0, kind="copd", size="small", workers=1,
                    progress=False, version=1)
    atlas = build_atlas(root / "cohort" / "template" / "lung_mask.nii.gz")
    atlas.save(root / "atlas.npz")
    preprocess(root / "cohort" / "images", root / "atlas.npz", root / "store", workers=1,
               progress=False)
    subject = "sub0000"
    image = root / "cohort" / "images" / f"{subject}.nii.gz"
    scan = dm.prepare_scan(image, root / "store", subject,
                           lung_mask=root / "cohort" / "masks" / f"{subject}.nii.gz")
    return {"root": root, "store": root / "store", "image": image, "subject": subject,
            "scan": scan, "mask": root / "cohort" / "masks" / f"{subject}.nii.gz",
            "lesions": root / "cohort" / "lesions" / f"{subject}.nii.gz"}


def tiny_encoder(seed: int = 0) -> Encoder:
    """A small real encoder with varied BN statistics, so representations differ by patch."""
    torch.manual_seed(seed)
    encoder = Encoder(rep_dim=8, moco_dim=4, num_experts=2, backend="grouped")
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.02, 0.1)  # larger activations than the default 1
    return encoder.eval()


def spread_head(rep_dim: int = 8, seed: int = 1) -> SubtypeHead:
    torch.manual_seed(seed)
    head = SubtypeHead(rep_dim, "centrilobular")
    with torch.no_grad():
        head.weight.normal_(0, 3.0)
    return head.eval()


class IntensityEncoder(nn.Module):
    """Stub encoder (rep_dim 1): mean network input over the central 4^3 voxels of the patch,
    i.e. voxels v-2 .. v+1 of the patch centred on v. Counts forward passes; can be told to
    raise after some calls (an interrupted job)."""

    rep_dim = 1

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_after = 0, fail_after
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        assert loc.shape == (x.shape[0], 3)
        return x[:, :, 14:18, 14:18, 14:18].mean(dim=(1, 2, 3, 4))[:, None]


def intensity_head(path: Path, training_subjects=("sub9999",)) -> Path:
    """A head file for ``IntensityEncoder``: p > 0.5 where the centre is brighter than 0.1
    (network units, about -330 HU), fitted on ``training_subjects`` (None: not recorded)."""
    return save_head(path, [20.0], -2.0, label="centrilobular", encoder={"rep_dim": 1},
                     source="stub", training_subjects=training_subjects)


def lung_interior_voxel(scan: dm.PreparedScan, margin: int = 3) -> np.ndarray:
    """A lung voxel whose (2 margin + 1)^3 neighbourhood is all lung, near the lung's middle."""
    from scipy import ndimage

    core = ndimage.binary_erosion(scan.lung, iterations=margin)
    candidates = np.argwhere(core)
    return candidates[np.argmin(np.abs(candidates - candidates.mean(axis=0)).sum(axis=1))]


# -- exactness --------------------------------------------------------------------------------

def reference_probability(encoder: Encoder, head: SubtypeHead, scan: dm.PreparedScan,
                          voxel: np.ndarray) -> float:
    """The paper's window for one voxel, from first principles, in float64: the 32^3 patch
    v-16..v+15 of the 1 mm scan (air outside), windowed and rounded as the store, the loop
    backend, the coordinate from the voxel's world point through the registration."""
    encoder64 = Encoder(**{**encoder.config, "backend": "loop"})
    encoder64.load_state_dict(encoder.state_dict())
    encoder64 = encoder64.double().eval()
    volume = np.pad(scan.iso.array.astype(np.float64), 40, constant_values=-1024)
    corner = voxel - 16 + 40
    patch = volume[corner[0]:corner[0] + 32, corner[1]:corner[1] + 32, corner[2]:corner[2] + 32]
    patch = np.rint(np.clip(patch, -1024, 240))
    x = torch.from_numpy((patch + 1024) / 632 - 1)[None, None]
    world = scan.iso.affine @ np.r_[voxel, 1.0]
    atlas_voxel = np.linalg.inv(scan.atlas.affine) @ (scan.subject_to_atlas @ world)
    coord = (atlas_voxel[:3] - 15.5) / scan.atlas.corners.max(axis=0) * 2 - 1
    with torch.no_grad():
        h = encoder64(x, torch.from_numpy(coord)[None])
        logit = h[0] @ head.weight.double() + head.bias.double()
    return float(torch.sigmoid(logit))


def test_exact_map_equals_the_encoder_on_the_centred_patch(cohort):
    scan, encoder, head = cohort["scan"], tiny_encoder(), spread_head()
    lung = np.argwhere(scan.lung)
    voxels = np.concatenate([lung[:: len(lung) // 5][:5], [[0, 1, 2]]])  # + one at the border
    values = dm.exact_probabilities(encoder, head, scan, voxels, batch=4, device="cpu",
                                    progress=False)
    reference = np.array([reference_probability(encoder, head, scan, v) for v in voxels])
    assert np.ptp(reference) > 0.05  # the check is not on a constant
    np.testing.assert_allclose(values, reference, atol=2e-5)


def test_maps_default_to_bf16_on_a_cpu_with_native_bf16_unless_opted_out(cohort, monkeypatch):
    from drasclr import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # bf16 runs anywhere
    monkeypatch.delenv(precision.CPU_BF16_VARIABLE, raising=False)
    scan, encoder, head = cohort["scan"], tiny_encoder(), spread_head()
    lung = np.argwhere(scan.lung)
    voxels = lung[:: len(lung) // 6][:6]
    reference = np.array([reference_probability(encoder, head, scan, v) for v in voxels])
    assert np.ptp(reference) > 0.05
    bf16 = dm.exact_probabilities(encoder, head, scan, voxels, batch=3, device="cpu",
                                  progress=False)
    error = np.abs(bf16 - reference).max()
    assert 2e-5 < error < 2e-2  # bf16 rounding, not float32's
    monkeypatch.setenv(precision.CPU_BF16_VARIABLE, "0")
    fp32 = dm.exact_probabilities(encoder, head, scan, voxels, batch=3, device="cpu",
                                  progress=False)
    np.testing.assert_allclose(fp32, reference, atol=2e-5)


def test_step_map_equals_step_one_on_the_evaluated_voxels(cohort):
    scan, encoder, head = cohort["scan"], tiny_encoder(), spread_head()
    centre = lung_interior_voxel(scan)
    region = np.zeros(scan.lung.shape, bool)
    region[tuple(slice(c - 1, c + 2) for c in centre)] = True  # 27 lung voxels
    kwargs = dict(region=region, batch=16, device="cpu", progress=False)
    step1 = dm.probability_map(encoder, head, scan, step=1, **kwargs)
    step2 = dm.probability_map(encoder, head, scan, step=2, **kwargs)
    on_grid = region & np.all(np.indices(region.shape) % 2 == 0, axis=0)
    assert on_grid.sum() >= 1
    np.testing.assert_array_equal(step2[on_grid], step1[on_grid])
    assert np.all(step2[~region] == 0) and np.all((step2[region] > 0) & (step2[region] < 1))


def test_grid_interpolation_is_trilinear_and_exact_on_grid():
    targets = np.ones((7, 7, 7), bool)
    points = dm.grid_points_for(targets, 3)
    assert set(map(int, np.unique(points))) == {0, 3, 6}
    values = points @ np.array([1.0, 2.0, -0.5])  # linear: trilinear reproduces it
    filled = dm.interpolate_grid(values, points, 3, targets)
    expected = np.einsum("ijkl,l->ijk", np.indices(targets.shape).transpose(1, 2, 3, 0),
                         np.array([1.0, 2.0, -0.5]))
    np.testing.assert_allclose(filled, expected, atol=1e-5)


def test_given_coordinates_replace_the_voxels_own(cohort):
    scan, encoder, head = cohort["scan"], tiny_encoder(), spread_head()
    voxels = lung_interior_voxel(scan)[None] + np.array([[0, 0, 0], [1, 0, 0], [0, 1, -1]])
    exact = dm.exact_probabilities(encoder, head, scan, voxels, device="cpu", progress=False)
    own = dm.exact_probabilities(encoder, head, scan, voxels, device="cpu", progress=False,
                                 coords=scan.coords_of_voxels(voxels))
    np.testing.assert_array_equal(own, exact)
    shared = dm.exact_probabilities(encoder, head, scan, voxels, device="cpu", progress=False,
                                    coords=np.repeat(scan.coords_of_voxels(voxels[:1]), 3, 0))
    assert shared[0] == pytest.approx(exact[0], abs=1e-5)  # its own coordinate
    assert np.abs(shared[1:] - exact[1:]).max() > 1e-4
    with pytest.raises(ValueError, match=r"coords: expected shape \(3, 3\)"):
        dm.exact_probabilities(encoder, head, scan, voxels, coords=np.zeros((2, 3)),
                               progress=False)


# -- geometry of the written map --------------------------------------------------------------

def planted_blob(cohort: dict, folder: Path, radius_mm: float = 4.0):
    """The subject's scan with a bright ball (100 HU) planted inside the lung, and the ball as
    a lesion file of centrilobular's label; returns (scan path, lesion path, ball centre mm,
    a 19^3 region of the 1 mm grid around it)."""
    from scipy import ndimage

    image = nib.load(cohort["image"])
    data = np.asarray(image.dataobj).astype(np.int16)
    mask = np.asarray(nib.load(cohort["mask"]).dataobj) > 0
    lung_voxels = np.argwhere(ndimage.binary_erosion(mask, iterations=5))
    blob_world = image.affine @ np.r_[lung_voxels[len(lung_voxels) // 3], 1.0]
    world = np.einsum("ij,jxyz->ixyz", image.affine[:3, :3], np.indices(data.shape)) \
        + image.affine[:3, 3, None, None, None]
    ball = np.linalg.norm(world - blob_world[:3, None, None, None], axis=0) <= radius_mm
    data[ball] = 100
    scan_path, lesion_path = folder / "planted.nii.gz", folder / "planted_lesions.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), scan_path)
    lesions = (ball * dm.lesion_value("centrilobular")).astype(np.uint8)
    nib.save(nib.Nifti1Image(lesions, image.affine), lesion_path)
    scan = cohort["scan"]
    iso_blob = np.rint(np.linalg.solve(scan.iso.affine, blob_world)[:3]).astype(int)
    region = np.zeros(scan.lung.shape, bool)
    region[tuple(slice(c - 9, c + 10) for c in iso_blob)] = True
    return scan_path, lesion_path, blob_world[:3], region


def test_written_map_overlays_the_scan(cohort, tmp_path):
    image = nib.load(cohort["image"])
    planted, _, blob_world, region = planted_blob(cohort, tmp_path)
    out = tmp_path / "map.nii.gz"
    result = dm.densemap(planted, cohort["store"], out, intensity_head(tmp_path / "head.pt"),
                         subject_id=cohort["subject"], lung_mask=cohort["mask"], region=region,
                         device="cpu", progress=False, encoder=IntensityEncoder())
    written = nib.load(out)
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    prob = np.asarray(written.dataobj, dtype=np.float32)
    assert written.get_data_dtype() == np.float32 and prob.max() > 0.9
    hot = np.argwhere(prob > 0.5)
    centre = written.affine[:3, :3] @ hot.mean(axis=0) + written.affine[:3, 3]
    assert np.linalg.norm(centre - blob_world) < 1.5  # mm: the blob, where it was planted
    assert result.subject_id == cohort["subject"] and not dm.work_dir_for(out).exists()
    percent = dm.write_map(tmp_path / "pct.nii.gz", prob, written.affine, percent=True)
    assert nib.load(percent).get_data_dtype() == np.uint8


def test_map_scored_against_its_lesion_file_within_the_mapped_voxels(cohort, tmp_path):
    """A planted lesion is found (AUC ~1, Dice high) when the lesion file marks it, not when
    the file marks another subtype's label; only mapped voxels are scored."""
    planted, lesions, _, region = planted_blob(cohort, tmp_path, radius_mm=5.0)
    result = dm.densemap(planted, cohort["store"], tmp_path / "map.nii.gz",
                         intensity_head(tmp_path / "head.pt"), subject_id=cohort["subject"],
                         lung_mask=cohort["mask"], region=region, step=2, device="cpu",
                         progress=False, encoder=IntensityEncoder())
    evaluation = dm.evaluate_map(result, lesions)
    scan_voxel_mm3 = abs(np.linalg.det(evaluation.affine[:3, :3]))
    mapped_mm3 = evaluation.lung.sum() * scan_voxel_mm3
    assert 0.8 * (region & cohort["scan"].lung).sum() < mapped_mm3 < 1.25 * region.sum()
    scores = evaluation.scores()
    assert scores["auc"] > 0.95 and scores["dice"] > 0.6 and 0 < scores["prevalence"] < 0.5

    other = dm.evaluate_map(result, lesions, lesion_label=dm.lesion_value("paraseptal"))
    assert not other.truth.any() and np.isnan(other.scores()["auc"])

    image = nib.load(lesions)
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[1:], image.affine), shifted)
    with pytest.raises(ValueError, match="shifted.nii.gz: lesion grid"):
        dm.evaluate_map(result, shifted)


def test_subject_found_from_the_image(cohort):
    assert dm.subject_of_image(cohort["store"], cohort["image"]) == cohort["subject"]
    with pytest.raises(ValueError, match="give --subject"):
        dm.subject_of_image(cohort["store"], cohort["mask"].with_name("other.nii.gz"))


# -- resuming ---------------------------------------------------------------------------------

def test_interrupted_job_resumes_without_redoing_finished_chunks(cohort, tmp_path):
    scan = cohort["scan"]
    centre = lung_interior_voxel(scan)
    region = np.zeros(scan.lung.shape, bool)
    region[tuple(slice(c - 2, c + 3) for c in centre)] = True  # 125 voxels
    head_path = intensity_head(tmp_path / "head.pt")
    out = tmp_path / "map.nii.gz"
    kwargs = dict(subject_id=cohort["subject"], lung_mask=cohort["mask"], region=region,
                  batch=10, chunk_voxels=20, device="cpu", progress=False)
    batches = 13  # forward passes uninterrupted: 6 chunks of 2 batches, then one of 5 voxels
    full = IntensityEncoder()
    dm.densemap(cohort["image"], cohort["store"], tmp_path / "full.nii.gz", head_path,
                encoder=full, **kwargs)
    assert full.calls == batches
    with pytest.raises(KeyboardInterrupt):
        dm.densemap(cohort["image"], cohort["store"], out, head_path,
                    encoder=IntensityEncoder(fail_after=5), **kwargs)
    work = dm.work_dir_for(out)
    assert sorted(p.name for p in work.glob("chunk_*.npy")) == ["chunk_000000.npy",
                                                                "chunk_000001.npy"]
    assert not out.exists()
    resumed = IntensityEncoder()
    dm.densemap(cohort["image"], cohort["store"], out, head_path, encoder=resumed, **kwargs)
    assert resumed.calls == batches - 4  # two finished chunks of two batches each
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj),
                                  np.asarray(nib.load(tmp_path / "full.nii.gz").dataobj))
    assert not work.exists()


def test_stale_work_folder_is_not_trusted(tmp_path, cohort):
    scan = cohort["scan"]
    voxels = lung_interior_voxel(scan)[None] + np.arange(6)[:, None] * np.array([1, 0, 0])
    work = tmp_path / "work"
    first = IntensityEncoder()
    a = dm.exact_probabilities(first, SubtypeHead(1), scan, voxels, batch=3, chunk_voxels=3,
                               work_dir=work, progress=False)
    other_head = SubtypeHead(1)
    with torch.no_grad():
        other_head.bias.fill_(3.0)
    second = IntensityEncoder()
    b = dm.exact_probabilities(second, other_head, scan, voxels, batch=3, chunk_voxels=3,
                               work_dir=work, progress=False)
    assert second.calls == 2 and not np.allclose(a, b)  # another head: recomputed


# -- scoring ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, detected", [(0.24, False), (0.26, True), (0.25, True)])
def test_detection_rule_on_hand_made_maps(fraction, detected):
    prob = np.zeros((48, 48, 48), np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    centre = np.array([24.0, 24.0, 24.0])
    box = dm.box_voxels(prob.shape, affine, centre)
    assert len(box) == 32 ** 3 and box.min() == 8 and box.max() == 39
    hot = box[: int(round(fraction * len(box)))]
    prob[hot[:, 0], hot[:, 1], hot[:, 2]] = 0.9
    prob[0, 0, 0] = 1.0  # outside the box: does not count
    lung = np.ones(prob.shape, bool)
    result, fractions = dm.box_detections(prob, lung, affine, centre[None])
    assert bool(result[0]) is detected
    assert fractions[0] == pytest.approx(round(fraction * len(box)) / len(box))


def test_box_fraction_is_over_the_lung_voxels_of_the_box():
    """A subpleural box: half of it is chest wall (no lung, probability 0 there); its lung half
    is 40 % hot. Over all voxels it holds 20 % (missed); over lung voxels 40 % (detected)."""
    rng = np.random.default_rng()
    prob = np.zeros((48, 48, 48), np.float32)
    lung = np.zeros(prob.shape, bool)
    lung[24:] = True  # the pleura at x = 24: the box 8..39 is half lung
    affine, centre = np.eye(4), np.array([[24.0, 24.0, 24.0]])
    box = dm.box_voxels(prob.shape, affine, centre[0])
    in_lung = box[lung[tuple(box.T)]]
    hot = in_lung[rng.choice(len(in_lung), int(0.4 * len(in_lung)), replace=False)]
    prob[tuple(hot.T)] = rng.uniform(0.51, 1.0, len(hot))
    detected, fractions = dm.box_detections(prob, lung, affine, centre)
    assert fractions[0] == pytest.approx(0.4, abs=1e-3) and detected[0]
    everywhere, _ = dm.box_detections(prob, np.ones(prob.shape, bool), affine, centre)
    assert not everywhere[0]
    none, fractions = dm.box_detections(prob, np.zeros(prob.shape, bool), affine, centre)
    assert np.isnan(fractions[0]) and not none[0]


def test_box_scores_from_maps():
    prob = np.zeros((100, 40, 40), np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels: boxes of 16^3 voxels
    prob[0:30] = 0.8  # boxes centred at x = 20 mm and x = 40 mm lie in the hot part
    centres = np.array([[20.0, 40, 40], [40.0, 40, 40], [120.0, 40, 40], [160.0, 40, 40]])
    detected, _ = dm.box_detections(prob, np.ones(prob.shape, bool), affine, centres)
    assert detected.tolist() == [True, True, False, False]
    scores = dm.box_scores(detected, np.array([True, False, True, False]))
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 1)
    assert scores["precision"] == scores["recall"] == scores["f1"] == pytest.approx(0.5)


def test_subject_boxes_from_an_annotation_csv(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("subject_id,label,x_mm,y_mm,z_mm\na,centrilobular,1,2,3\na,healthy,4,5,6\n"
                    "a,paraseptal,7,8,9\nb,centrilobular,0,0,0\n")
    centres, positive = dm.subject_boxes(path, "a", "centrilobular")
    np.testing.assert_array_equal(centres, [[1, 2, 3], [4, 5, 6]])
    assert positive.tolist() == [True, False]
    (tmp_path / "bad.csv").write_text("subject,where\na,1\n")
    with pytest.raises(ValueError, match="bad.csv: not an annotation CSV"):
        dm.subject_boxes(tmp_path / "bad.csv", "a", "centrilobular")


def test_truth_scores_on_a_hand_made_case():
    lung = np.ones((2, 2, 3), bool)
    lung[1, 1, 2] = False
    truth = np.zeros_like(lung)
    truth[0, 0, :2] = True
    prob = np.full(lung.shape, 0.1, np.float32)
    prob[0, 0, 0], prob[0, 0, 1], prob[1, 0, 0] = 0.9, 0.4, 0.7
    prob[1, 1, 2] = 0.99  # outside the lung: ignored
    scores = dm.truth_scores(prob, truth, lung)
    # positives 0.9, 0.4; negatives 0.7 and eight 0.1: pairs won 9 + 8 of 18
    assert scores["auc"] == pytest.approx(17 / 18)
    assert scores["dice"] == pytest.approx(2 * 1 / (2 + 2))
    assert scores["voxels"] == 11 and scores["prevalence"] == pytest.approx(2 / 11)
    assert np.isnan(dm.truth_scores(prob, np.zeros_like(truth), lung)["auc"])


def test_report_section_with_overlay(tmp_path):
    shape = (24, 20, 16)
    lung = np.zeros(shape, bool)
    lung[3:21, 3:17, 2:14] = True
    truth = np.zeros(shape, bool)
    truth[8:12, 8:12, 6:9] = True
    prob = np.where(lung, 0.6, 0).astype(np.float32)  # 39% of the box's voxels above 0.5
    prob[7:12, 8:13, 6:9] = 0.9
    scan = np.where(lung, -850, 0).astype(np.float32)
    evaluation = dm.MapEvaluation("s1", "centrilobular", scan, prob, truth, lung, np.eye(4),
                                  np.array([[10.0, 10, 7]]), np.array([True]))
    healthy = dm.MapEvaluation("s2", "centrilobular", scan, prob, np.zeros(shape, bool), lung,
                               np.eye(4), np.array([[10.0, 10, 7], [4.0, 4, 4]]),
                               np.array([False, False]))
    section = dm.report_sections([evaluation, healthy], tmp_path)[0]
    table = section.tables[0]
    assert table.rows[0][:2] == ["s1", "centrilobular"]
    assert table.rows[0][5:8] == [1, 0, 0]  # the box is detected: a true positive
    assert table.rows[1][5:8] == [0, 2, 0]  # the healthy subject's boxes: false positives
    pooled = dict(zip(table.columns, table.rows[2]))
    assert pooled["subject"] == "all (2)" and pooled["box precision"] == pytest.approx(1 / 3)
    assert pooled["box recall"] == 1.0 and pooled["box F1"] == pytest.approx(0.5)
    assert list(pooled["voxel AUC"].values) == [evaluation.scores()["auc"]]  # healthy: no AUC
    figure = tmp_path / section.figures[0].path
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- head files and errors --------------------------------------------------------------------

def test_head_file_round_trip(tmp_path):
    encoder = tiny_encoder()
    path = save_head(tmp_path / "ft.pt", torch.arange(8.0)[None], torch.tensor([0.5]),
                     label="paraseptal", encoder=encoder, include_encoder_weights=True,
                     source="fine-tuned")
    head, loaded, metadata = load_head(path)
    assert metadata["label"] == "paraseptal" and metadata["rep_dim"] == 8
    assert metadata["training_subjects"] is None  # not given: not recorded
    recorded = save_head(tmp_path / "recorded.pt", np.ones(8), 0.0, label="paraseptal",
                         encoder=encoder.config, training_subjects=["s2", "s1", "s2"])
    assert load_head(recorded)[2]["training_subjects"] == ("s1", "s2")
    np.testing.assert_array_equal(head.weight.detach().numpy(), np.arange(8.0))
    assert float(head.bias.detach()) == 0.5
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    h = torch.randn(3, 8)
    torch.testing.assert_close(head(h), torch.sigmoid(h @ torch.arange(8.0) + 0.5))
    head2, encoder2, _ = head_and_encoder(path)  # no checkpoint needed
    assert encoder2 is not None and head2.rep_dim == 8
    with pytest.warns(UserWarning, match="carries its fine-tuned encoder; other.pt is not used"):
        head_and_encoder(path, "other.pt")


def test_head_errors_name_the_file(tmp_path):
    encoder = tiny_encoder()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{garbage}: not a drasclr head file"):
        load_head(garbage)
    other = tmp_path / "other.pt"
    torch.save({"format": "drasclr-pretrain", "version": 1}, other)
    with pytest.raises(ValueError, match=f"{other}: not a drasclr head file"):
        load_head(other)
    good = save_head(tmp_path / "probe.pt", np.ones(8), 0.0, label="centrilobular",
                     encoder=encoder.config)
    state = torch.load(good, weights_only=True)
    for change, message in [({"version": 2}, "version 2, expected 1"),
                            ({"weight": torch.ones(5)}, "does not match the encoder's rep_dim 8"),
                            ({"label": None, "bias": None}, None)]:
        broken = {**state, **change}
        if message is None:  # missing keys
            del broken["label"], broken["bias"]
            message = r"missing keys \['label', 'bias'\]"
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(ValueError, match=message):
            load_head(tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="linear probe without encoder weights"):
        head_and_encoder(good)
    with pytest.raises(FileNotFoundError, match="no such head file"):
        load_head(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="weight: expected 8 values"):
        save_head(tmp_path / "bad.pt", np.ones(3), 0.0, label="x", encoder=encoder.config)


def test_head_encoder_mismatch_is_an_error(tmp_path):
    from drasclr.pretrain.checkpoints import save_checkpoint

    big = Encoder(rep_dim=16, moco_dim=4, num_experts=2)
    checkpoint = save_checkpoint({"encoder_q": big.state_dict(), "encoder_config": big.config},
                                 tmp_path / "encoder.pt")
    head_path = save_head(tmp_path / "probe.pt", np.ones(8), 0.0, label="centrilobular",
                          encoder=tiny_encoder().config)
    with pytest.raises(ValueError, match=f"{head_path}: head expects representations of size "
                                         f"8, but the encoder of {checkpoint} produces 16"):
        head_and_encoder(head_path, checkpoint)
    head, _, _ = load_head(head_path)
    with pytest.raises(ValueError, match="head expects representations of size 8"):
        check_head_matches(head, big, head_path, "x")


def test_step_below_one_is_an_error(cohort, capsys):
    scan = cohort["scan"]
    for step in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"step: expected an integer in \[1, inf\)"):
            dm.probability_map(IntensityEncoder(), SubtypeHead(1), scan, step=step)
    from drasclr.cli import main

    assert main(["densemap", "--head", "h.pt", "--image", "x.nii.gz", "--store", "s", "--out",
                 "m.nii.gz", "--step", "0"]) == 2
    assert "--step: expected an integer of at least 1, got 0" in capsys.readouterr().err


def test_subject_without_registration_is_an_error(cohort, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="'nobody' has no saved registration"):
        dm.prepare_scan(cohort["image"], cohort["store"], "nobody")
    from drasclr.cli import main

    head_path = intensity_head(tmp_path / "head.pt")
    code = main(["densemap", "--head", str(head_path), "--image", str(cohort["image"]),
                 "--store", str(cohort["store"]), "--subject", "nobody",
                 "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no saved registration" in err and len(err.strip().splitlines()) == 1


def test_cli_maps_and_scores_a_scan(cohort, tmp_path, monkeypatch, capsys):
    """The command end to end (stub encoder; subject found from --image; step 6)."""
    import drasclr.evaluation.head as head_module
    from drasclr.cli import main

    head_path = intensity_head(tmp_path / "head.pt")
    stub = IntensityEncoder()

    def stub_head_and_encoder(path, checkpoint=None, device="cpu"):
        head, _, metadata = load_head(path)
        return head, stub, metadata

    monkeypatch.setattr(head_module, "head_and_encoder", stub_head_and_encoder)
    out = tmp_path / "map.nii.gz"
    code = main(["densemap", "--head", str(head_path), "--image", str(cohort["image"]),
                 "--store", str(cohort["store"]), "--out", str(out), "--step", "6",
                 "--device", "cpu", "--lung-mask", str(cohort["mask"]), "--no-progress",
                 "--lesions", str(cohort["lesions"]), "--batch", "256",
                 "--annotations", str(cohort["root"] / "cohort" / "annotations.csv")])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and stub.calls > 0
    assert f"of subject {cohort['subject']}" in printed and "voxel AUC" in printed
    assert "0 centrilobular, 12 healthy; precision" in printed  # an emphysema-free subject
    assert nib.load(out).shape == nib.load(cohort["image"]).shape

    # boxes the head was trained on are refused; a head without the record only warns
    arguments = ["densemap", "--image", str(cohort["image"]), "--store", str(cohort["store"]),
                 "--out", str(out), "--step", "6", "--device", "cpu", "--lung-mask",
                 str(cohort["mask"]), "--no-progress", "--batch", "256", "--annotations",
                 str(cohort["root"] / "cohort" / "annotations.csv")]
    trained = intensity_head(tmp_path / "trained.pt", (cohort["subject"], "sub0003"))
    assert main([*arguments, "--head", str(trained)]) == 2
    assert f"trained on the boxes of subject {cohort['subject']}" in capsys.readouterr().err
    old = intensity_head(tmp_path / "old.pt", None)
    with pytest.warns(UserWarning, match="does not record the subjects it was trained on"):
        assert main([*arguments, "--head", str(old)]) == 0
    assert "12 healthy; precision" in capsys.readouterr().out
