"""Version 2 of the synthetic cohort: a test bed in which density is not an oracle and
location matters (docs/synthetic_cohort.md)."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from lifelines.utils import concordance_index
from scipy.stats import ks_2samp
from sklearn.linear_model import LinearRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, cross_val_score

from drasclr.cli import main
from drasclr.data.density import COPD_DENSITY, density_measures
from drasclr.data.synthetic import (
    generate_cohort, map_template_points, plan_subject, render_subject, sample_clinical,
)
from drasclr.data.synthetic.anatomy import size_spec
from drasclr.data.synthetic.clinical import bode_index, gold_stage
from drasclr.data.synthetic.cohort import COPD_COLUMNS_V2
from drasclr.data.synthetic.disease import CENTRILOBULAR, PARASEPTAL
from drasclr.data.synthetic.subject_anatomy import atlas_anatomy, chest_geometry
from drasclr.worker_exit import die_with_parent

SEED = 11
COHORT = 200


def _summary(index: int) -> dict:
    """One small subject rendered in memory, reduced to what the tests read: the density
    measures on its image inside its true lung mask (as preprocessing computes them), its
    clinical row, and its boxes with their template-space pleural depth."""
    image, lung, _, truth = render_subject(plan_subject(SEED, index, "copd", "small"))
    template = chest_geometry("small").template
    from drasclr.data.synthetic.transform import SubjectTransform

    boxes = truth["annotations"]
    depth, zone = [], []
    if boxes:
        points = SubjectTransform.from_dict(truth).subject_to_template(
            np.array([[b["x_mm"], b["y_mm"], b["z_mm"]] for b in boxes]))
        voxels = np.rint(points - template.affine[:3, 3]).astype(int)
        voxels = np.clip(voxels, 0, np.asarray(template.lung.shape) - 1)
        depth = template.pleura_distance[tuple(voxels.T)].tolist()
        zone = template.zone(points[:, 2]).tolist()
    density = density_measures(image, lung > 0, np.asarray(truth["image_affine"]))
    return {"density": density, "clinical": truth["clinical"],
            "boxes": [(b["label"], d, z) for b, d, z in zip(boxes, depth, zone)],
            "diseased": truth["clinical"]["emphysema_true"] > 0}


@pytest.fixture(scope="module")
def cohort_summary():
    """200 small version-2 subjects rendered in two worker processes (no files)."""
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(2, mp_context=context, initializer=die_with_parent,
                             initargs=(__import__("os").getpid(),)) as pool:
        return list(pool.map(_summary, range(COHORT), chunksize=5))


def _cv_r2(x: np.ndarray, y: np.ndarray) -> float:
    return float(cross_val_score(LinearRegression(), np.asarray(x, float).reshape(len(y), -1), y,
                                 cv=KFold(5, shuffle=True, random_state=0), scoring="r2").mean())


def test_no_density_measure_is_an_oracle_of_lung_function(cohort_summary):
    y = np.log([s["clinical"]["fev1pp"] for s in cohort_summary])
    measured = {name: _cv_r2([s["density"][name] for s in cohort_summary], y)
                for name in COPD_DENSITY}
    emphysema = _cv_r2([s["clinical"]["emphysema_true"] for s in cohort_summary], y)
    every_process = _cv_r2([[s["clinical"][c] for c in ("emphysema_true", "airway_true",
                                                        "small_airway_true")]
                            for s in cohort_summary], y)
    assert max(measured.values()) < 0.6, measured
    assert emphysema > measured["laa950_percent"], (emphysema, measured)
    assert measured["laa950_percent"] > 0.1  # density still carries signal
    assert every_process > emphysema + 0.1


def test_healthy_boxes_match_lesion_boxes_in_depth_and_zone(cohort_summary):
    """Pleural depth (template mm) and zone (0 base, 1 apex) of the box centres."""
    lesion = np.array([b[1:] for s in cohort_summary for b in s["boxes"] if b[0] != "healthy"])
    healthy = np.array([b[1:] for s in cohort_summary for b in s["boxes"] if b[0] == "healthy"])
    from_diseased = sum(b[0] == "healthy" for s in cohort_summary if s["diseased"]
                        for b in s["boxes"])
    assert len(lesion) > 100 and len(healthy) > 100 and from_diseased > 20
    for column, tolerance in ((0, 1.5), (1, 0.1)):
        assert abs(np.mean(healthy[:, column]) - np.mean(lesion[:, column])) < tolerance
        assert ks_2samp(healthy[:, column], lesion[:, column]).statistic < 0.2


def test_sharp_kernel_raises_laa950_on_the_same_subject():
    index = next(i for i in range(40)
                 if 0.02 < sum(sample_clinical(SEED, i)["emphysema_shares"].values()) < 0.1)
    laa = []
    for kernel, sigma, noise in ((0, 0.7, 16.0), (1, 0.25, 40.0)):
        plan = plan_subject(SEED, index, "copd", "small")
        scanner = dataclasses.replace(plan.scanner, kernel=kernel, sharpness_sigma_mm=sigma,
                                      noise_sd_hu=noise)
        image, lung, *_ = render_subject(dataclasses.replace(plan, scanner=scanner))
        laa.append(100 * np.mean(image[lung > 0] < -950))
    assert laa[1] > laa[0] + 1.0, laa


def test_deeper_inspiration_lowers_lung_density():
    density = []
    for inspiration in (0.85, 1.0):
        plan = plan_subject(SEED, 1, "copd", "small")
        plan = dataclasses.replace(plan, anatomy={**plan.anatomy, "inspiration": inspiration})
        image, lung, *_ = render_subject(plan)
        density.append(float(np.mean(image[lung > 0])))
    assert density[1] < density[0] - 10, density


def test_subjects_have_their_own_anatomy_and_the_atlas_is_none_of_them():
    """Lung volumes differ; at the same template points, vessels differ between subjects and
    from the atlas while the lungs correspond."""
    atlas = atlas_anatomy("small")
    rng = np.random.default_rng(0)
    deep = np.argwhere(atlas.pleura_distance >= 4)
    points = deep[rng.choice(len(deep), 4000, replace=False)] + atlas.affine[:3, 3]
    atlas_vessel = atlas.hu[tuple((points - atlas.affine[:3, 3]).astype(int).T)] > -600
    volumes, vessels = [], []
    for index in (0, 1, 2):
        image, lung, lesion, truth = render_subject(plan_subject(SEED, index, "copd", "small"))
        spacing = np.asarray(truth["scanner"]["spacing_mm"])
        volumes.append(np.count_nonzero(lung) * np.prod(spacing) / 1000)
        mapped = map_template_points(truth, points)
        voxels = np.rint((mapped - np.asarray(truth["image_affine"])[:3, 3]) / spacing).astype(int)
        assert np.mean(lung[tuple(voxels.T)] > 0) > 0.95
        vessels.append(image[tuple(voxels.T)] > -600)
    assert np.std(volumes) / np.mean(volumes) > 0.05, volumes
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = vessels[a] & vessels[b]
        assert both.sum() < 0.5 * min(vessels[a].sum(), vessels[b].sum())
    both = vessels[0] & atlas_vessel
    assert both.sum() < 0.5 * min(vessels[0].sum(), atlas_vessel.sum())


@pytest.mark.parametrize("size, low, high", [("full", 5.0, 10.0), ("small", 2.5, 5.0)])
def test_residual_misalignment_after_the_best_affine_fit(size, low, high):
    """5-10 mm RMS over the lungs of a full-size chest, half that in the half-size chest."""
    small = chest_geometry("small").template  # every size's chest is the small one scaled
    lung = np.argwhere(small.lung[::4, ::4, ::4] > 0) * 4 + small.affine[:3, 3]
    lung *= size_spec(size).scale / small.size.scale
    for index in range(5):
        transform = plan_subject(SEED, index, "copd", size).transform
        mapped = transform.template_to_subject(lung)  # the fixed-point iteration converges
        design = np.c_[lung, np.ones(len(lung))]
        fit = design @ np.linalg.lstsq(design, mapped, rcond=None)[0]
        rms = np.sqrt(np.mean(np.sum((mapped - fit) ** 2, axis=1)))
        assert low <= rms <= high, (index, rms)
        np.testing.assert_allclose(transform.subject_to_template(mapped), lung, atol=1e-4)


def test_clinical_model_separates_the_disease_processes():
    plans = [sample_clinical(SEED, i) for i in range(600)]
    rows = [p["clinical"] for p in plans]
    emphysema = np.array([sum(p["emphysema_shares"].values()) for p in plans])
    assert rows[5] == plan_subject(SEED, 5, "copd", "small").clinical
    gold = np.array([r["gold"] for r in rows])
    assert set(gold) == {-1, 0, 1, 2, 3, 4}
    assert all(gold_stage(r["fev1pp"], r["fev1_fvc"]) == r["gold"] for r in rows)
    assert all(r["prism"] == (r["gold"] == -1) for r in rows)
    assert all(bode_index(r["bmi"], r["fev1pp"], r["mmrc"], r["walk_m"]) == r["bode"]
               for r in rows)
    # Airway disease lowers FEV1 among subjects without emphysema.
    free = emphysema == 0
    airway = np.array([r["airway_true"] for r in rows])
    log_fev1 = np.log([r["fev1pp"] for r in rows])
    assert free.sum() > 100
    assert np.corrcoef(airway[free], log_fev1[free])[0, 1] < -0.3
    # Exacerbations follow airway disease more than emphysema.
    exacerbation = np.array([r["exacerbation"] for r in rows])
    assert roc_auc_score(exacerbation, airway) > roc_auc_score(exacerbation, emphysema)
    time, death = [r["survival_time"] for r in rows], [r["death"] for r in rows]
    assert 0.15 < np.mean(death) < 0.6
    assert concordance_index(time, [-r["bode"] for r in rows], death) > 0.6


def test_version_2_files_resume_and_refuse_another_version(tmp_path, capsys):
    out = tmp_path / "v2"
    assert main(["synth", "--out", str(out), "--subjects", "2", "--seed", str(SEED), "--size",
                 "small", "--version", "2", "--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / "cohort.json").read_text())["generator_version"] == "2.0"
    truth = json.loads((out / "truth" / "sub0001.json").read_text())
    assert truth["generator_version"] == "2.0" and truth["scanner"]["kernel"] in (0, 1)
    header = (out / "clinical.csv").read_text().splitlines()[0].split(",")
    assert header == COPD_COLUMNS_V2
    annotations = (out / "annotations.csv").read_text().splitlines()[0]
    assert annotations == "subject_id,label,x_mm,y_mm,z_mm,i,j,k,box_mm"
    with pytest.raises(ValueError, match="already holds a cohort"):
        generate_cohort(out, 2, seed=SEED, size="small", workers=1, progress=False, version=1)
    with pytest.raises(ValueError, match="version"):
        generate_cohort(tmp_path / "bad", 1, size="small", version=3)


def test_emphysema_patterns_keep_their_texture():
    """Centrilobular lobules keep an artery inside, paraseptal holes lie along the pleura."""
    index = next(i for i in range(60)
                 if min(sample_clinical(SEED, i)["emphysema_shares"][n]
                        for n in ("centrilobular", "paraseptal")) > 0.01)
    image, lung, lesion, truth = render_subject(plan_subject(SEED, index, "copd", "small"))
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(lung > 0, sampling=truth["scanner"]["spacing_mm"])
    cle, pse = lesion == CENTRILOBULAR, lesion == PARASEPTAL
    assert np.median(depth[pse]) < 5.0 < np.median(depth[cle])
    assert np.mean(image[cle] > -800) > 0.02  # arteries and walls left inside
    assert np.median(image[cle]) < np.median(image[(lung > 0) & (lesion == 0)]) - 30


def test_covid_cohort_renders_under_version_2():
    index = next(i for i in range(50)
                 if 0.3 <= sample_clinical(SEED, i, "covid")["involvement"] <= 0.7)
    image, lung, lesion, truth = render_subject(plan_subject(SEED, index, "covid", "small"))
    involved = 100 * np.mean(lesion[lung > 0] > 0)
    assert truth["clinical"]["covid_grade"] == 1 + int(involved // 25)
    assert -700 < np.median(image[lesion == 1]) < -300
    assert truth["clinical"]["site"] in range(4)
