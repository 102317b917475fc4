"""Per-stage cost of ``process_subject`` on a clinical-size CT, and its two speed-ups' ratios.

Measured in one run, on one core (one ITK thread); the compared pairs are interleaved round by
round (benchmarks/interleave.py) and reported as the median per-round ratio with its spread:

1. ``process_subject`` stage by stage (read, resample, segment, register, cut) on a
   clinical-size scan: a full-size synthetic subject re-gridded to 512 x 512 in-plane voxels
   (air around the body, as in a scanner's field of view) and 0.7 mm slices, saved as NIfTI.
2. Resampling to 1 mm: the separable B-spline (``resample_isotropic``) against
   ``scipy.ndimage.zoom(order=3)``, the one-call library equivalent, on the same volume.
3. Registration on a small synthetic subject: the ``fast`` schedule against the ``reference``
   schedule (docs/method.md#registration), with both landmark errors against the truth.

    .venv/bin/python benchmarks/bench_subject.py [--skip-reference] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from interleave import Rounds, interleave

FULL_INPLANE = 512
SLICE_MM = 0.7


def clinical_size_scan(cohort: Path, out: Path) -> Path:
    """A full-size synthetic subject on a 512 x 512 x (0.7 mm slices) grid, int16 NIfTI."""
    from drasclr.data.resample import resample_axis

    image = nib.load(sorted((cohort / "images").glob("*.nii.gz"))[0])
    hu = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    slice_step = SLICE_MM / np.linalg.norm(affine[:3, 2])
    hu = resample_axis(hu, 2, np.arange(0, hu.shape[2] - 1, slice_step))
    affine = affine @ np.diag([1, 1, slice_step, 1])
    pad = [(max(0, (FULL_INPLANE - n) // 2), max(0, FULL_INPLANE - n - (FULL_INPLANE - n) // 2))
           for n in hu.shape[:2]] + [(0, 0)]
    hu = np.pad(hu, pad, constant_values=-1024)
    shift = np.eye(4)
    shift[:3, 3] = [-pad[0][0], -pad[1][0], 0]
    path = out / "clinical_size.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine @ shift), path)
    return path


def time_stages(scan: Path, atlas) -> tuple[dict[str, float], float]:
    """Wall seconds per stage, and the CPU seconds of the whole call: on a shared machine the
    CPU time is the better estimate of what one dedicated core needs (one thread throughout)."""
    from drasclr.data.subject import process_subject

    start = time.process_time()
    result = process_subject(scan, atlas)
    return dict(result.quality), time.process_time() - start


def time_resampling(scan: Path, rounds: int) -> Rounds:
    """Our resampler and scipy's zoom (both single-threaded), interleaved round by round."""
    from scipy import ndimage

    from drasclr.data.io import read_ct
    from drasclr.data.resample import resample_isotropic

    volume = read_ct(scan)
    shape = resample_isotropic(volume).array.shape
    factors = (np.asarray(shape) - 1) / (np.asarray(volume.array.shape) - 1)
    return interleave({
        "ours": lambda: resample_isotropic(volume),
        "scipy zoom": lambda: ndimage.zoom(volume.array, factors, order=3, mode="mirror",
                                           output=np.float32, grid_mode=False),
    }, rounds, warmup=False)


def time_schedules(cohort: Path, schedules: list[str], rounds: int
                   ) -> tuple[Rounds, dict[str, float]]:
    """Whole ``process_subject`` calls per registration schedule on a small subject,
    interleaved round by round (the schedules differ only in registration), and each
    schedule's mean landmark error (mm) against the truth."""
    from drasclr.data.atlas import build_atlas
    from drasclr.data.subject import process_subject
    from drasclr.data.synthetic import map_template_points

    atlas = build_atlas(cohort / "template" / "lung_mask.nii.gz")
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    truth = json.loads((cohort / "truth" / image.name.replace(".nii.gz", ".json")).read_text())
    true_points = map_template_points(truth, atlas.centres_world())
    results = {}

    def run(schedule: str) -> None:
        result = process_subject(image, atlas, schedule=schedule)
        found = nib.affines.apply_affine(result.affine, result.landmark_voxels)
        results[schedule] = float(np.linalg.norm(found - true_points, axis=1).mean())

    timed = interleave({s: (lambda s=s: run(s)) for s in schedules}, rounds, warmup=False)
    return timed, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of each compared pair (default 3)")
    args = parser.parse_args()
    # One core: ITK reads its thread count when it first runs, which is after this point.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    from drasclr.data.atlas import build_atlas
    from drasclr.data.synthetic import generate_cohort

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        full = generate_cohort(folder / "full", 1, seed=0, kind="copd", size="full", workers=1,
                               progress=False)
        scan = clinical_size_scan(full, folder)
        atlas = build_atlas(full / "template" / "lung_mask.nii.gz")
        print(f"scan {nib.load(scan).shape}, atlas {atlas.num_landmarks} landmarks")
        time_stages(scan, atlas)  # warm-up: imports ANTs, first-touch allocations
        stages, cpu_seconds = time_stages(scan, atlas)
        total = sum(v for k, v in stages.items() if k.startswith("seconds_"))
        print("process_subject stages (s):", {k: round(float(v), 2) for k, v in stages.items()},
              f"wall total {total:.1f} s, CPU {cpu_seconds:.1f} s")
        resampling = time_resampling(scan, args.rounds)
        print(f"resample to 1 mm: ours {resampling.median('ours'):.2f} s, scipy zoom "
              f"{resampling.median('scipy zoom'):.2f} s (medians); scipy / ours per round "
              f"{resampling.describe('scipy zoom', 'ours')}")
        small = generate_cohort(folder / "small", 1, seed=0, kind="copd", size="small", workers=1,
                                progress=False)
        schedules = ["fast"] + ([] if args.skip_reference else ["reference"])
        timed, errors = time_schedules(small, schedules, args.rounds)
        for schedule, error in errors.items():
            print(f"process_subject with the {schedule} schedule: {timed.median(schedule):.1f} s "
                  f"(median), mean landmark error {error:.2f} mm")
        if len(schedules) == 2:
            print(f"reference / fast per round: {timed.describe('reference', 'fast')}")


if __name__ == "__main__":
    main()
