"""The landmark atlas (docs/method.md#atlas-and-landmarks): grid rule, threshold raising,
coords, neighbours, file."""
import os
import subprocess
import tempfile
import sys
from itertools import product

import nibabel as nib
import numpy as np
import pytest

from drasclr.cli import main as cli_main
from drasclr.data.atlas import (
    Atlas, atlas_from_landmarks, build_atlas, nearest_neighbours, patch_lung_fractions,
)
from drasclr.data.introsort import classic_argsort

PATCH, STEP = 8, 6


def write_mask(path, array, affine=None):
    affine = np.diag([-1.5, 1.0, 2.0, 1.0]) if affine is None else affine
    affine[:3, 3] = (10.0, -20.0, 30.0)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture
def random_mask(tmp_path):
    """Two random blobby 'lungs' labelled 50 and 100 in a 41 x 37 x 30 volume."""
    rng = np.random.default_rng(7)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (41, 37, 30)], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.9, 0.8, 0.9])[:, None, None, None]) ** 2).sum(0))
    lung = radius + 0.3 * rng.random(radius.shape) < 0.95
    labels = np.where(lung, np.where(grid[0] < 0, 50, 100), 0).astype(np.int16)
    return write_mask(tmp_path / "mask.nii.gz", labels), labels


def reference_landmarks(labels, patch, step, threshold):
    """Triple loop over the grid, as the reference script does."""
    corners = []
    for i, j, k in product(*[range(0, n - patch, step) for n in labels.shape]):
        if (labels[i:i + patch, j:j + patch, k:k + patch] > 0).mean() > threshold:
            corners.append((i, j, k))
    return np.array(corners)


def test_landmarks_match_the_triple_loop_rule(random_mask):
    path, labels = random_mask
    atlas = build_atlas(path, patch_size=PATCH, step=STEP)
    expected = reference_landmarks(labels, PATCH, STEP, 0.1)
    assert 10 < len(expected) < 1000
    np.testing.assert_array_equal(atlas.corners, expected)
    assert atlas.corners.dtype == np.int64 and atlas.min_lung_fraction == 0.1
    np.testing.assert_array_equal(atlas.mask, labels.astype(np.uint8))
    # The first pass follows the memory layout: C and Fortran order must agree.
    starts = [np.arange(0, n - PATCH, STEP) for n in labels.shape]
    np.testing.assert_array_equal(
        patch_lung_fractions(np.ascontiguousarray(labels > 0), starts, PATCH),
        patch_lung_fractions(np.asfortranarray(labels > 0), starts, PATCH),
    )


def test_threshold_rises_by_tenths_until_fewer_than_max(random_mask):
    path, labels = random_mask
    counts = {t: len(reference_landmarks(labels, PATCH, STEP, t)) for t in (0.1, 0.2, 0.3, 0.4, 0.5)}
    limit = counts[0.3] + 1  # 0.1 and 0.2 keep too many, 0.3 is the first that fits
    assert counts[0.2] >= limit > counts[0.3]
    atlas = build_atlas(path, patch_size=PATCH, step=STEP, max_landmarks=limit)
    assert atlas.min_lung_fraction == pytest.approx(0.3)
    np.testing.assert_array_equal(atlas.corners, reference_landmarks(labels, PATCH, STEP, 0.3))


def test_coords_neighbours_and_centres(random_mask):
    path, _ = random_mask
    atlas = build_atlas(path, patch_size=PATCH, step=STEP, k_max=5)
    corners = atlas.corners.astype(np.float64)
    np.testing.assert_allclose(atlas.coords, corners / corners.max(0) * 2 - 1, atol=1e-6)
    assert atlas.coords.dtype == np.float32

    distance = np.linalg.norm(corners[:, None] - corners[None], axis=-1)
    for landmark in range(atlas.num_landmarks):
        others = [j for j in range(atlas.num_landmarks) if j != landmark]
        nearest = sorted(others, key=lambda j: (distance[landmark, j], j))[:5]
        assert atlas.neighbours[landmark].tolist() == nearest
    np.testing.assert_array_equal(atlas.neighbour_table(2), atlas.neighbours[:, :2])
    with pytest.raises(ValueError, match="k: expected 0..5"):
        atlas.neighbour_table(6)

    centre = atlas.corners[3] + (PATCH - 1) / 2
    np.testing.assert_allclose(atlas.centres_voxel()[3], centre)
    affine = nib.load(str(path)).affine
    np.testing.assert_allclose(atlas.centres_world()[3], (affine @ np.append(centre, 1))[:3])


def test_axis_with_single_grid_position_maps_to_minus_one(tmp_path):
    labels = np.ones((12, 30, 30), np.uint8)  # one corner position along axis 0
    atlas = build_atlas(write_mask(tmp_path / "flat.nii", labels), patch_size=PATCH, step=STEP)
    assert np.all(atlas.corners[:, 0] == 0)
    assert np.all(atlas.coords[:, 0] == -1) and np.isfinite(atlas.coords).all()


def test_save_load_round_trip_is_atomic(random_mask, tmp_path):
    path, _ = random_mask
    atlas = build_atlas(path, patch_size=PATCH, step=STEP)
    out = tmp_path / "sub" / "atlas.npz"
    atlas.save(out)
    assert [p.name for p in out.parent.iterdir()] == ["atlas.npz"]
    loaded = Atlas.load(out)
    for name in ("corners", "coords", "neighbours", "mask", "affine"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(atlas, name))
    assert (loaded.patch_size, loaded.step, loaded.min_lung_fraction, loaded.source) == (
        PATCH, STEP, 0.1, str(path))


def test_bad_files_and_arguments_are_clear_errors(random_mask, tmp_path):
    path, _ = random_mask
    with pytest.raises(FileNotFoundError, match="no atlas file"):
        Atlas.load(tmp_path / "missing.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, corners=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="not a drasclr atlas"):
        Atlas.load(foreign)
    with pytest.raises(FileNotFoundError, match="no such mask"):
        build_atlas(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match="expected a 3D lung mask"):
        build_atlas(write_mask(tmp_path / "flat2d.nii", np.ones((20, 20), np.uint8)))
    with pytest.raises(ValueError, match="no lung voxels"):
        build_atlas(write_mask(tmp_path / "air.nii", np.zeros((20, 20, 20), np.uint8)), patch_size=PATCH)
    with pytest.raises(ValueError, match="step"):
        build_atlas(path, step=0)
    image = write_mask(tmp_path / "image.nii", np.zeros((10, 10, 10), np.float32))
    with pytest.raises(ValueError, match="does not match the mask"):
        build_atlas(path, patch_size=PATCH, step=STEP, image_path=image)


def test_cli_builds_and_saves(random_mask, tmp_path, capsys):
    path, _ = random_mask
    out = tmp_path / "atlas.npz"
    args = ["atlas", "--mask", str(path), "--out", str(out), "--patch-size", "8", "--step", "6"]
    assert cli_main(args) == 0
    assert Atlas.load(out).num_landmarks == build_atlas(path, patch_size=8, step=6).num_landmarks
    assert "landmarks" in capsys.readouterr().out
    assert cli_main(["atlas", "--mask", str(tmp_path / "nope.nii"), "--out", str(out)]) == 2
    assert "no such mask file" in capsys.readouterr().err


def test_real_atlas_mask_gives_575_landmarks(atlas_mask_path):
    atlas = build_atlas(atlas_mask_path)
    assert atlas.num_landmarks == 575
    assert atlas.min_lung_fraction == 0.1
    assert atlas.mask.max() == 100 and atlas.mask.dtype == np.uint8


def test_coords_of_points_continue_the_landmark_convention(random_mask):
    """At a landmark's centre the point coordinate is the landmark's; elsewhere it is linear in
    the atlas voxel position (a 1 mm step moves it by 2 / corners.max per axis)."""
    path, _ = random_mask
    atlas = build_atlas(path, patch_size=PATCH, step=STEP)
    np.testing.assert_allclose(atlas.coords_of_points(atlas.centres_world()), atlas.coords, atol=1e-6)
    rng = np.random.default_rng(4)
    voxels = rng.uniform(0, 40, size=(20, 3))
    world = voxels @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    corners = voxels - (PATCH - 1) / 2
    expected = corners / atlas.corners.max(0).astype(np.float64) * 2 - 1
    np.testing.assert_allclose(atlas.coords_of_points(world), expected, atol=1e-5)


def authors_landmark_file(path, labels, extra):
    """An ``atlas_patch_loc.npy`` as the authors' atlas script writes it: the grid rule's
    corners (ITK index x, y, z = NIfTI i, j, k), plus ``extra`` corners their mask kept."""
    corners = np.concatenate([reference_landmarks(labels, PATCH, STEP, 0.1), extra])
    np.save(path, corners)
    return path, corners


def test_authors_landmark_file_imports_as_is(random_mask, tmp_path):
    mask_path, labels = random_mask
    extra = np.array([[0, 0, 0], [STEP * 5, STEP * 4, 0]])  # patches of little or no lung
    landmarks, corners = authors_landmark_file(tmp_path / "atlas_patch_loc.npy", labels, extra)
    atlas = atlas_from_landmarks(mask_path, landmarks, patch_size=PATCH, k_max=4)
    np.testing.assert_array_equal(atlas.corners, corners)  # file order: the landmark index
    loaded_raw = np.load(landmarks).astype(np.float64)
    np.testing.assert_allclose(atlas.coords, loaded_raw / loaded_raw.max(0) * 2 - 1, atol=1e-6)
    fractions = [(labels[i:i + PATCH, j:j + PATCH, k:k + PATCH] > 0).mean() for i, j, k in corners]
    assert atlas.min_lung_fraction == pytest.approx(min(fractions)) and min(fractions) < 0.1
    assert atlas.step == STEP and atlas.neighbour_ties == "authors"
    distance = np.linalg.norm(corners[:, None] - corners[None], axis=-1)
    np.testing.assert_array_equal(
        atlas.neighbours, [classic_argsort(row)[1:5] for row in distance])

    out = tmp_path / "atlas.npz"
    atlas.save(out)
    loaded = Atlas.load(out)
    assert (loaded.landmark_source, loaded.neighbour_ties) == (str(landmarks), "authors")
    np.testing.assert_array_equal(loaded.neighbours, atlas.neighbours)


def test_authors_landmark_cli_and_bad_files(random_mask, tmp_path, capsys):
    mask_path, labels = random_mask
    landmarks, corners = authors_landmark_file(tmp_path / "loc.npy", labels, np.zeros((0, 3), int))
    out = tmp_path / "atlas.npz"
    assert cli_main(["atlas", "--mask", str(mask_path), "--landmarks", str(landmarks), "--out",
                     str(out), "--patch-size", str(PATCH)]) == 0
    assert f"{len(corners)} landmarks from" in capsys.readouterr().out
    np.testing.assert_array_equal(Atlas.load(out).corners, corners)
    assert cli_main(["atlas", "--mask", str(mask_path), "--landmarks", str(landmarks), "--out",
                     str(out), "--step", "5"]) == 2
    assert "--step: grid-rule options have no effect" in capsys.readouterr().err

    bad = {"shape": np.zeros((4, 2), int), "negative": -np.ones((3, 3), int),
           "fraction": np.full((3, 3), 0.5), "outside": np.array([[0, 0, 0], [40, 0, 0]]),
           "repeated": np.zeros((2, 3), int)}
    messages = {"shape": r"expected an \(L, 3\) array", "negative": "non-negative integer",
                "fraction": "non-negative integer", "outside": "outside the mask",
                "repeated": "more than once"}
    for name, array in bad.items():
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(ValueError, match=messages[name]) as error:
            atlas_from_landmarks(mask_path, tmp_path / f"{name}.npy", patch_size=PATCH)
        assert f"{name}.npy" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such landmark file"):
        atlas_from_landmarks(mask_path, tmp_path / "missing.npy")


def test_classic_argsort_is_numpys_sort_without_simd():
    """The authors' ``np.argsort`` as numpy runs it without its x86 SIMD sorts (and as it ran
    before them): fresh random rows with many ties, sorted in a child process with every
    dispatched CPU feature switched off."""
    from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_features__

    rng = np.random.default_rng()
    rows = [rng.integers(0, rng.integers(2, 30), size=rng.integers(2, 700)).astype(np.float64)
            for _ in range(60)]
    rows.append(np.sort(rows[0])[::-1].copy())  # descending input
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(
        f for f, found in __cpu_features__.items() if found and f not in __cpu_baseline__))
    code = ("import sys, numpy as np; rows = np.load(sys.argv[1], allow_pickle=True); "
            "np.save(sys.argv[2], np.array([np.argsort(r) for r in rows], dtype=object))")

    with tempfile.TemporaryDirectory() as folder:
        source, result = os.path.join(folder, "rows.npy"), os.path.join(folder, "order.npy")
        np.save(source, np.array(rows, dtype=object), allow_pickle=True)
        subprocess.run([sys.executable, "-c", code, source, result], env=env, check=True)
        expected = np.load(result, allow_pickle=True)
    for row, order in zip(rows, expected):
        np.testing.assert_array_equal(classic_argsort(row), order)
        np.testing.assert_array_equal(row[classic_argsort(row)], np.sort(row))


def test_heapsort_fallback_sorts():
    """Rows deep enough to exhaust the quicksort depth limit finish with heapsort."""
    from drasclr.data import introsort

    rng = np.random.default_rng()
    values = rng.integers(0, 9, size=300).astype(float)
    order = list(range(300))
    introsort._heapsort(values.tolist(), order, 10, 250)
    assert order[:10] == list(range(10)) and order[251:] == list(range(251, 300))
    assert np.all(np.diff(values[order[10:251]]) >= 0)


def test_authors_ties_differ_from_index_ties_on_a_grid(random_mask):
    path, _ = random_mask
    atlas = build_atlas(path, patch_size=PATCH, step=STEP, k_max=2, neighbour_ties="authors")
    index = nearest_neighbours(atlas.corners, 2, "index")
    distance = np.linalg.norm(atlas.corners[:, None] - atlas.corners[None], axis=-1)
    rows = np.arange(atlas.num_landmarks)[:, None]
    np.testing.assert_array_equal(distance[rows, atlas.neighbours], distance[rows, index])
    assert (atlas.neighbours != index).any()  # same distances, other landmarks
