"""Dense voxel maps on CPU: throughput against a reference-style sliding window, and how far
fast mode is from the exact map (Yu et al. 2023, Section 4.3.1, Fig. 3).

Speed (same run, interleaved rounds A, B, C, D, A, B, ... by benchmarks/interleave.py; ratio =
voxels/s of a variant over voxels/s of the reference in the same round; median and min-max over
rounds):

- ``reference``: the paper's sliding window as the authors' code would run it: one patch per
  forward pass, loop backend, each patch cut from the volume on its own;
- ``exact``: ``exact_probabilities`` (batches of per-voxel coordinates, grouped backend);
- ``shared4``: the same with the coordinate of a 4^3 block shared (voxels of a 4^3 block share the block
  centre's coordinate): does grouping coordinates matter?
- ``fast``: ``dense_pass.fast_probabilities``, one dense pass per ``--block``^3 tile.

Voxels are lung voxels of a small synthetic subject (paper-size encoder: 8 experts, rep_dim
128, random weights; speed does not depend on the weights).

Agreement (``--agreement``): a linear-probe head (centrilobular against healthy boxes of the
cohort's ``annotations.csv``, on the same random-weight encoder), then for each subject with
centrilobular lesions one ``--block``^3 tile around its lesions: the fast map of the tile and
the exact map at ``--sample`` random lung voxels of it; Pearson r and Dice at 0.5 between
them, and each one's voxel AUC against the true lesion mask at those voxels.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_densemap.py --rounds 5
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_densemap.py --agreement --subjects 8
    make bench                                    # pytest-benchmark: exact mode, 27 voxels
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from drasclr.evaluation import densemap as dm
from drasclr.evaluation.head import SubtypeHead
from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from dense_pass import agreement as map_agreement, fast_probabilities
from interleave import interleave

HERE = Path(__file__).resolve().parent


def build_cohort(root: Path, subjects: int) -> Path:
    """A small synthetic COPD cohort preprocessed into ``root/store`` (registrations)."""
    from drasclr.data.atlas import build_atlas
    from drasclr.data.preprocess import preprocess
    from drasclr.data.synthetic import generate_cohort

    generate_cohort(root / "cohort", subjects, seed=0, kind="copd", size="small", workers=1,
                    progress=False)
    build_atlas(root / "cohort" / "template" / "lung_mask.nii.gz").save(root / "atlas.npz")
    preprocess(root / "cohort" / "images", root / "atlas.npz", root / "store", workers=1,
               progress=False)
    return root


def load_scan(root: Path, subject: str) -> dm.PreparedScan:
    cohort = root / "cohort"
    return dm.prepare_scan(cohort / "images" / f"{subject}.nii.gz", root / "store", subject,
                           lung_mask=cohort / "masks" / f"{subject}.nii.gz")


def paper_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(rep_dim=128, moco_dim=128, num_experts=8, backend="grouped").eval()


def reference_window(encoder: Encoder, head: SubtypeHead, scan: dm.PreparedScan,
                     voxels: np.ndarray) -> np.ndarray:
    """One voxel at a time: cut its patch (air outside the scan), its coordinate, one
    forward pass with the loop backend; what a per-window loop over the reference does."""
    encoder.backend = "loop"
    try:
        out = np.empty(len(voxels), np.float32)
        padded = np.pad(scan.hu, dm.HALF, constant_values=-1024)
        with torch.inference_mode():
            for i, voxel in enumerate(voxels):
                c = voxel  # corner v - 16, shifted by the padding of 16
                patch = torch.from_numpy(padded[c[0]:c[0] + 32, c[1]:c[1] + 32, c[2]:c[2] + 32].copy())
                x = normalise_hu(patch)[None, None]
                loc = torch.from_numpy(scan.coords_of_voxels(voxel[None]))
                out[i] = float(head(encoder(x, loc))[0])
    finally:
        encoder.backend = "grouped"
    return out


def interior_cube(scan: dm.PreparedScan, edge: int) -> np.ndarray:
    """(edge^3, 3) voxels of a cube of lung voxels in the middle of the lung."""
    core = np.argwhere(ndimage.binary_erosion(scan.lung, iterations=edge // 2 + 1))
    centre = core[np.argmin(np.abs(core - core.mean(axis=0)).sum(axis=1))]
    return centre - edge // 2 + np.indices((edge,) * 3).reshape(3, -1).T


def shared_coordinates(encoder: Encoder, head: SubtypeHead, scan: dm.PreparedScan,
                       voxels: np.ndarray, block: int, batch: int) -> np.ndarray:
    """The exact window, except that the voxels of each ``block``^3 block share the block
    centre's coordinate and are batched together (a batch mixes few kernels)."""
    blocks = voxels // block
    order = np.lexsort(blocks.T[::-1])  # block by block, so a batch spans few blocks
    centres = blocks[order] * block + (block - 1) / 2.0
    values = np.empty(len(voxels), dtype=np.float32)
    values[order] = dm.exact_probabilities(encoder, head, scan, voxels[order], batch=batch,
                                           device="cpu", progress=False,
                                           coords=scan.coords_of_voxels(centres))
    return values


def speed(root: Path, rounds: int, block: int, exact_edge: int, reference_voxels: int,
          batch: int) -> None:
    scan = load_scan(root, "sub0000")
    encoder, head = paper_encoder(), SubtypeHead(128)
    with torch.no_grad():
        head.weight.normal_(0, 0.3)
    cube = interior_cube(scan, exact_edge)
    tile = (cube[0] // block) * block
    tile_voxels = tile + np.indices((block,) * 3).reshape(3, -1).T
    tile_voxels = tile_voxels[scan.lung[tuple(tile_voxels.T)]]  # the lung voxels of one tile
    variants = {
        "reference": (lambda: reference_window(encoder, head, scan, cube[:reference_voxels]),
                      reference_voxels),
        "exact": (lambda: dm.exact_probabilities(encoder, head, scan, cube, batch=batch,
                                                 device="cpu", progress=False), len(cube)),
        "shared4": (lambda: shared_coordinates(encoder, head, scan, cube, 4, batch), len(cube)),
        "fast": (lambda: fast_probabilities(encoder, head, scan, tile_voxels, block=block,
                                               device="cpu", progress=False), len(tile_voxels)),
    }
    # the warm-up lets oneDNN build its kernels on first use
    timed = interleave({name: run for name, (run, _) in variants.items()}, rounds,
                       report=lambda line: print(line, flush=True))
    rates = {name: [count / s for s in timed.seconds[name]] for name, (_, count) in variants.items()}
    reference = np.array(rates["reference"])
    print(f"\nvoxels per round: reference {reference_voxels}, exact/shared4 {len(cube)} "
          f"(batch {batch}), fast {len(tile_voxels)} (one {block}^3 tile)")
    print("| variant | voxels/s per round | ratio to reference: median (min-max) |")
    print("|---|---|---|")
    for name, values in rates.items():
        ratio = np.array(values) / reference
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {np.median(ratio):.2f}x "
              f"({ratio.min():.2f}-{ratio.max():.2f}x) |")
    exact = dm.exact_probabilities(encoder, head, scan, cube, batch=batch, device="cpu",
                                   progress=False)
    shared = shared_coordinates(encoder, head, scan, cube, 4, batch)
    ref = reference_window(encoder, head, scan, cube[:reference_voxels])
    print(f"\nmax |exact - reference| {np.abs(exact[:reference_voxels] - ref).max():.2e}; "
          f"shared4 against exact: max |diff| {np.abs(shared - exact).max():.2e}, "
          f"{map_agreement(shared, exact)}")


def calibrate(encoder: Encoder, root: Path, subjects: list[str], patches: int = 256) -> Encoder:
    """BatchNorm statistics of the random-weight encoder from random lung patches of the
    cohort (a random encoder is used frozen only after this, as ``drasclr.features`` does)."""
    rng = np.random.default_rng(0)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average
    encoder.train()
    with torch.no_grad():
        for subject in subjects:
            scan = load_scan(root, subject)
            lung = np.argwhere(scan.lung)
            voxels = lung[rng.choice(len(lung), patches // len(subjects), replace=False)]
            gatherer = dm.PatchGatherer(scan.hu, dm.HALF, torch.device("cpu"))
            for batch in np.array_split(voxels, max(1, len(voxels) // 16)):
                encoder(gatherer.patches(batch), torch.from_numpy(scan.coords_of_voxels(batch)))
    return encoder.eval()


def probe_head(root: Path, encoder: Encoder, subjects: list[str], label: str) -> SubtypeHead:
    """Logistic regression on h of the cohort's 32 mm boxes: ``label`` against healthy."""
    import csv

    from sklearn.linear_model import LogisticRegression

    rows = list(csv.DictReader(open(root / "cohort" / "annotations.csv")))
    features, targets = [], []
    for subject in subjects:
        mine = [r for r in rows if r["subject_id"] == subject and r["label"] in (label, "healthy")]
        if not mine:
            continue
        scan = load_scan(root, subject)
        points = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in mine])
        voxels = np.rint(np.linalg.solve(scan.iso.affine, np.c_[points, np.ones(len(points))].T
                                         )[:3].T).astype(np.int64)
        gatherer = dm.PatchGatherer(scan.hu, dm.HALF + 8, torch.device("cpu"))
        with torch.inference_mode():
            h = encoder(gatherer.patches(voxels), torch.from_numpy(scan.coords_of_voxels(voxels)))
        features.append(h.numpy())
        targets += [r["label"] == label for r in mine]
    x, y = np.concatenate(features), np.array(targets)
    mean, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=0.05, max_iter=5000).fit((x - mean) / sd, y)
    print(f"probe: {y.sum()} {label} and {(~y).sum()} healthy boxes, training accuracy "
          f"{model.score((x - mean) / sd, y):.2f}")
    head = SubtypeHead(x.shape[1], label)
    with torch.no_grad():  # standardisation folded into the linear head
        weight = model.coef_[0] / sd
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.fill_(float(model.intercept_[0] - weight @ mean))
    return head.eval()


def agreement(root: Path, subjects: list[str], block: int, sample: int, batch: int,
              label: str = "centrilobular", max_subjects: int = 3) -> None:
    import nibabel as nib

    encoder = calibrate(paper_encoder(), root, subjects)
    head = probe_head(root, encoder, subjects, label)
    rng = np.random.default_rng(0)
    print("| subject | voxels | Pearson r | Dice (p > 0.5) | mean abs diff | exact AUC | fast AUC "
          "| exact at v+x: r, Dice | exact s | fast s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    done = 0
    for subject in subjects:
        lesions_path = root / "cohort" / "lesions" / f"{subject}.nii.gz"
        scan = load_scan(root, subject)
        lesions = nib.load(lesions_path)
        truth = dm.to_original_grid(  # the true lesion mask on the 1 mm grid (nearest)
            (np.asarray(lesions.dataobj) == dm.lesion_value(label)).astype(np.float32),
            lesions.affine, scan.iso.array.shape, scan.iso.affine) >= 0.5
        truth &= scan.lung
        if truth.sum() < 50:
            continue
        # the tile holding the most lesion voxels
        tiles, counts = np.unique(np.argwhere(truth) // block, axis=0, return_counts=True)
        tile = tiles[np.argmax(counts)] * block
        voxels = tile + np.indices((block,) * 3).reshape(3, -1).T
        voxels = voxels[scan.lung[tuple(voxels.T)]]
        picked = voxels[rng.choice(len(voxels), min(sample, len(voxels)), replace=False)]
        start = time.perf_counter()
        fast_all = fast_probabilities(encoder, head, scan, voxels, block=block, device="cpu",
                                         progress=False)
        fast_seconds = time.perf_counter() - start
        fast = fast_all[np.array([np.flatnonzero((voxels == p).all(axis=1))[0] for p in picked])]
        start = time.perf_counter()
        exact = dm.exact_probabilities(encoder, head, scan, picked, batch=batch, device="cpu",
                                       progress=False)
        exact_seconds = time.perf_counter() - start
        shifted = dm.exact_probabilities(encoder, head, scan, picked + np.array([1, 0, 0]),
                                         batch=batch, device="cpu", progress=False)
        baseline = map_agreement(shifted, exact)  # how alike neighbouring voxels are
        t = truth[tuple(picked.T)]
        scores = map_agreement(fast, exact)
        aucs = []
        for values in (exact, fast):
            lung_here = np.ones(len(t), bool)
            aucs.append(dm.truth_scores(values, t, lung_here)["auc"])
        print(f"| {subject} | {len(picked)} of {len(voxels)} ({100 * t.mean():.0f}% lesion) | "
              f"{scores['pearson']:.3f} | {scores['dice']:.3f} | {scores['mean_abs']:.3f} | "
              f"{aucs[0]:.3f} | {aucs[1]:.3f} | {baseline['pearson']:.3f}, {baseline['dice']:.3f} | "
              f"{exact_seconds:.1f} | {fast_seconds:.1f} |",
              flush=True)
        done += 1
        if done == max_subjects:
            break


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> dm.PreparedScan:
    root = build_cohort(tmp_path_factory.mktemp("bench_densemap"), 1)
    return load_scan(root, "sub0000")


def test_exact_27_voxels(benchmark, small_scan):
    encoder, head = paper_encoder(), SubtypeHead(128)
    cube = interior_cube(small_scan, 3)
    values = benchmark(lambda: dm.exact_probabilities(encoder, head, small_scan, cube, batch=16,
                                                      device="cpu", progress=False))
    assert values.shape == (27,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=32, help="fast-mode tile edge")
    parser.add_argument("--exact-edge", type=int, default=6, help="exact mode: cube edge")
    parser.add_argument("--reference-voxels", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--agreement", action="store_true")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--sample", type=int, default=400, help="exact voxels per subject")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(dir=HERE) as folder:
        root = build_cohort(Path(folder), args.subjects if args.agreement else 1)
        if args.agreement:
            agreement(root, [f"sub{i:04d}" for i in range(args.subjects)], args.block,
                      args.sample, args.batch)
        else:
            speed(root, args.rounds, args.block, args.exact_edge, args.reference_voxels,
                  args.batch)


if __name__ == "__main__":
    main()
