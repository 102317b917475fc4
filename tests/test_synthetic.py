"""The synthetic cohort's promised properties and its contract with the pipeline (generator
version 1; version 2: test_synthetic_v2.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from lifelines.utils import concordance_index
from scipy import ndimage
from scipy.stats import spearmanr

from drasclr.cli import main
from drasclr.data.synthetic import (
    generate_cohort, map_template_points, plan_subject, render_subject, sample_clinical,
)
from drasclr.data.synthetic.anatomy import template_anatomy
from drasclr.data.synthetic.clinical import gold_stage
from drasclr.data.synthetic.cohort import subject_id
from drasclr.data.synthetic.disease import CENTRILOBULAR, PARASEPTAL

SEED = 7
V1 = {"version": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three small COPD subjects written through the process pool."""
    return generate_cohort(tmp_path_factory.mktemp("cohort"), 3, seed=SEED, size="small",
                           workers=2, progress=False, **V1)


@pytest.fixture(scope="module")
def rendered():
    """Eight small COPD subjects rendered in memory, chosen to span emphysema severity."""
    extent = np.array([sum(sample_clinical(SEED, i, **V1)["emphysema_shares"].values())
                       for i in range(60)])
    order = np.argsort(extent, kind="stable")
    picked = order[np.linspace(len(order) // 2, len(order) - 1, 8).astype(int)]
    picked[0] = order[0]  # one emphysema-free subject
    return [render_subject(plan_subject(SEED, int(i), "copd", "small", **V1)) for i in picked]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_identical_files_also_after_resume(cohort, tmp_path):
    again = generate_cohort(tmp_path / "again", 3, seed=SEED, size="small", workers=1,
                            progress=False, **V1)
    expected = _files(cohort)
    assert _files(again) == expected
    # An interrupted run (a subject without its truth record) is completed identically.
    (again / "truth" / "sub0001.json").unlink()
    (again / "images" / "sub0001.nii.gz").write_bytes(b"truncated")
    generate_cohort(again, 3, seed=SEED, size="small", workers=1, progress=False, **V1)
    assert _files(again) == expected
    other = generate_cohort(tmp_path / "other", 1, seed=SEED + 1, size="small", workers=1,
                            progress=False, **V1)
    assert _files(other)["images/sub0000.nii.gz"] != expected["images/sub0000.nii.gz"]
    with pytest.raises(ValueError, match="already holds a cohort"):
        generate_cohort(again, 3, seed=SEED + 1, size="small", workers=1, progress=False, **V1)
    with pytest.raises(ValueError, match="already holds a cohort"):
        generate_cohort(again, 3, seed=SEED, size="small", workers=1, progress=False)  # v2


#: sha256 of subject sub0000's files (seed 7, small), written by generator version 1 before
#: version 2 existed: version 1 stays byte-identical.
V1_SUB0000_SHA256 = {
    "images/sub0000.nii.gz": "baf1bd264c5756755b7ce71f754ba77ddfbce94c55182b54bc35c367912ee75d",
    "lesions/sub0000.nii.gz": "c66434b2bb7a43635bf711fd905cba8864892dae0654791750c97d8df356570c",
    "masks/sub0000.nii.gz": "1f65182f000e8936be207eea74544d6ad07a090e470b9cef4998519bd3ea50ac",
    "truth/sub0000.json": "96bfe712a89bcbbd6ca0f9db53548ad01cd821ec2edd208fa2519032a31280e5",
}


def test_version_1_files_are_unchanged(cohort):
    found = {name: hashlib.sha256((cohort / name).read_bytes()).hexdigest()
             for name in V1_SUB0000_SHA256}
    assert found == V1_SUB0000_SHA256
    assert json.loads((cohort / "cohort.json").read_text())["generator_version"] == "1.0"


def test_files_load_with_the_right_geometry(cohort):
    for name in (subject_id(i) for i in range(3)):
        truth = json.loads((cohort / "truth" / f"{name}.json").read_text())
        spacing = truth["scanner"]["spacing_mm"]
        images = {f: nib.load(cohort / f / f"{name}.nii.gz") for f in ("images", "masks", "lesions")}
        for folder, image in images.items():
            assert image.get_data_dtype() == (np.int16 if folder == "images" else np.uint8)
            assert image.shape == tuple(truth["scanner"]["shape"])
            np.testing.assert_allclose(image.affine, truth["image_affine"], atol=1e-4)
            np.testing.assert_allclose(image.header.get_zooms(), spacing, rtol=1e-5)
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert all(85 <= n <= 135 for n in images["images"].shape)
        assert 1.2 <= spacing[0] <= 2.0 and 1.2 <= spacing[2] <= 2.0
        hu = np.asarray(images["images"].dataobj)
        lungs = np.asarray(images["masks"].dataobj)
        assert set(np.unique(lungs)) == {0, 1, 2}
        assert -950 < np.median(hu[lungs > 0]) < -750 and np.median(hu[lungs == 0]) > -1010
        # Label 1 is the right lung: larger world x (RAS+).
        centre_x = [(images["masks"].affine @ [*np.argwhere(lungs == l).mean(0), 1])[0]
                    for l in (1, 2)]
        assert centre_x[0] > centre_x[1]
    template = nib.load(cohort / "template" / "lung_mask.nii.gz")
    np.testing.assert_allclose(template.header.get_zooms(), 1.0)
    assert np.allclose(template.affine[:3, :3], np.eye(3))
    rows = (cohort / "clinical.csv").read_text().splitlines()
    assert rows[0].startswith("subject_id,age,sex,race,smoking_status,pack_years,fev1pp")
    assert len(rows) == 4 and json.loads((cohort / "cohort.json").read_text())["subjects"] == 3


def test_small_template_gives_a_few_dozen_landmarks():
    lung = template_anatomy("small").lung > 0
    corners = np.stack(np.meshgrid(*[np.arange(0, n - 31, 26) for n in lung.shape],
                                   indexing="ij"), -1).reshape(-1, 3)
    kept = [c for c in corners if lung[c[0]:c[0] + 32, c[1]:c[1] + 32, c[2]:c[2] + 32].mean() > 0.1]
    assert 20 <= len(kept) <= 80


def test_map_template_points_follows_the_anatomy(cohort):
    template = template_anatomy("small")
    rng = np.random.default_rng(0)
    deep = np.argwhere(template.pleura_distance >= 4)
    points = deep[rng.choice(len(deep), 300, replace=False)] + template.affine[:3, 3]
    for name in (subject_id(i) for i in range(3)):
        truth = json.loads((cohort / "truth" / f"{name}.json").read_text())
        mapped = map_template_points(truth, points)
        mask = nib.load(cohort / "masks" / f"{name}.nii.gz")
        voxels = np.rint(nib.affines.apply_affine(np.linalg.inv(mask.affine), mapped)).astype(int)
        expected = template.lung[tuple((points - template.affine[:3, 3]).astype(int).T)]
        found = np.asarray(mask.dataobj)[tuple(voxels.T)]
        assert np.mean(found == expected) > 0.97
        # The non-affine part is small: what an affine registration can reach.
        affine = np.asarray(truth["template_to_subject_affine"])
        residual = np.linalg.norm(nib.affines.apply_affine(affine, points) - mapped, axis=1)
        assert 0.1 < np.sqrt(np.mean(residual**2)) < 1.2 and residual.max() < 3.5


def test_slab_sampling_coordinates_match_the_pointwise_map():
    """The separable per-slab coordinates equal the float64 point-by-point mapping."""
    template = template_anatomy("small")
    plan = plan_subject(SEED + 3, 2, "copd", "small", **V1)
    scanner, rng = plan.scanner, np.random.default_rng(1)
    slabs = list(plan.transform.template_voxel_slabs(scanner.affine, scanner.shape,
                                                     template.affine, slab=7))
    assert [rows.start for rows, _ in slabs] == list(range(0, scanner.shape[0], 7))
    coordinates = np.concatenate([c for _, c in slabs], axis=1)
    voxels = np.stack([rng.integers(0, n, 500) for n in scanner.shape], 1)
    world = voxels * scanner.spacing_mm + scanner.affine[:3, 3]
    expected = plan.transform.subject_to_template(world) - template.affine[:3, 3]
    np.testing.assert_allclose(coordinates[(slice(None), *voxels.T)].T, expected, atol=1e-3)
    # And the forward map inverts it.
    np.testing.assert_allclose(plan.transform.template_to_subject(
        plan.transform.subject_to_template(world)), world, atol=1e-5)


def test_laa950_tracks_true_emphysema_imperfectly(rendered):
    laa = np.array([100 * np.mean(image[lung > 0] < -950) for image, lung, _, _ in rendered])
    true = np.array([t["clinical"]["emphysema_true"] for *_, t in rendered])
    assert true[0] == 0 and true.max() > 5
    assert spearmanr(laa, true).statistic > 0.8
    assert np.max(np.abs(laa - true)) > 0.5  # noise, offset, blur and panlobular change


def test_centrilobular_lies_deeper_than_paraseptal(rendered):
    depths = {CENTRILOBULAR: [], PARASEPTAL: []}
    for _, lung, lesion, truth in rendered:
        depth = ndimage.distance_transform_edt(lung > 0, sampling=truth["scanner"]["spacing_mm"])
        for label in depths:
            depths[label].append(depth[lesion == label])
    cle, pse = (np.concatenate(depths[label]) for label in (CENTRILOBULAR, PARASEPTAL))
    assert len(cle) > 100 and len(pse) > 100
    assert np.median(cle) > 2 * np.median(pse)
    assert np.percentile(pse, 95) < 12.0


def test_annotation_boxes_sit_on_lesions_of_their_subtype(rendered):
    names = {"centrilobular": CENTRILOBULAR, "paraseptal": PARASEPTAL, "healthy": 0}
    hits = {name: [] for name in names}
    for image, lung, lesion, truth in rendered:
        for box in truth["annotations"]:
            i, j, k = box["i"], box["j"], box["k"]
            world = np.asarray(truth["image_affine"]) @ [i, j, k, 1]
            assert np.allclose(world[:3], [box["x_mm"], box["y_mm"], box["z_mm"]], atol=1.0)
            near = lesion[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2]
            if box["label"] == "healthy":
                hits["healthy"].append(lung[i, j, k] > 0 and not near.any())
            else:
                hits[box["label"]].append(np.any(near == names[box["label"]]))
    assert all(len(found) >= 5 and np.mean(found) > 0.8 for found in hits.values())


def test_gold_stages_and_survival_of_200_subjects():
    clinical = [sample_clinical(SEED, i, **V1)["clinical"] for i in range(200)]
    assert clinical[5] == plan_subject(SEED, 5, "copd", "small", **V1).clinical
    gold = np.array([c["gold"] for c in clinical])
    assert set(gold) == {-1, 0, 1, 2, 3, 4}
    assert all(gold_stage(c["fev1pp"], c["fev1_fvc"]) == c["gold"] for c in clinical)
    assert all(c["prism"] == (c["gold"] == -1) for c in clinical)
    time = [c["survival_time"] for c in clinical]
    death = [c["death"] for c in clinical]
    assert 0.2 < np.mean(death) < 0.8
    assert concordance_index(time, [-c["severity"] for c in clinical], death) > 0.65


def test_covid_subject_has_graded_peripheral_lower_opacities():
    index = next(i for i in range(50)
                 if 0.3 <= sample_clinical(SEED, i, "covid", **V1)["involvement"] <= 0.7)
    image, lung, lesion, truth = render_subject(plan_subject(SEED, index, "covid", "small", **V1))
    involved = 100 * np.mean(lesion[lung > 0] > 0)
    grade = truth["clinical"]["covid_grade"]
    assert grade == 1 + int(involved // 25) and grade in (2, 3)
    assert -700 < np.median(image[lesion == 1]) < -300
    assert -150 < np.median(image[lesion == 2]) < 100
    z = np.argwhere(lung > 0)[:, 2]
    lower = z < np.median(z)
    assert np.mean(lesion[lung > 0][lower] > 0) > np.mean(lesion[lung > 0][~lower] > 0)


@pytest.mark.parametrize("arguments, message", [
    ({"subjects": 0}, "subjects"),
    ({"kind": "flu"}, "kind"),
    ({"size": "huge"}, "size"),
])
def test_bad_arguments_are_clear_errors(tmp_path, arguments, message, capsys):
    call = {"subjects": 1, "kind": "copd", "size": "small", **arguments}
    with pytest.raises(ValueError, match=message):
        generate_cohort(tmp_path / "c", call["subjects"], kind=call["kind"], size=call["size"])
    code = main(["synth", "--out", str(tmp_path / "c"), "--subjects", str(call["subjects"]),
                 "--kind", call["kind"], "--size", call["size"], "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err


def test_unwritable_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write the cohort"):
        generate_cohort(blocker / "cohort", 1, size="small")
    assert main(["synth", "--out", str(blocker / "cohort"), "--subjects", "1"]) == 2
    assert "a_file" in capsys.readouterr().err
