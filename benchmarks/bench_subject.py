"""Per-stage cost of ``process_subject`` on a clinical-size CT, and its two speed-ups' ratios.

Measured in one run, on one core (one ITK thread):

1. ``process_subject`` stage by stage (read, resample, segment, register, cut) on a
   clinical-size scan: a full-size synthetic subject re-gridded to 512 x 512 in-plane voxels
   (air around the body, as in a scanner's field of view) and 0.7 mm slices, saved as NIfTI.
2. Resampling to 1 mm: the separable B-spline (``resample_isotropic``) against
   ``scipy.ndimage.zoom(order=3)``, the one-call library equivalent, on the same volume.
3. Registration on a small synthetic subject: the ``fast`` schedule against the ``reference``
   schedule (docs/method.md#registration), with both landmark errors against the truth.

    .venv/bin/python benchmarks/bench_subject.py [--skip-reference]
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


def time_resampling(scan: Path) -> tuple[float, float]:
    """CPU seconds (both single-threaded) of our resampler and of scipy's zoom."""
    from scipy import ndimage

    from drasclr.data.io import read_ct
    from drasclr.data.resample import resample_isotropic

    volume = read_ct(scan)
    start = time.process_time()
    ours = resample_isotropic(volume).array
    separable = time.process_time() - start
    factors = (np.asarray(ours.shape) - 1) / (np.asarray(volume.array.shape) - 1)
    start = time.process_time()
    ndimage.zoom(volume.array, factors, order=3, mode="mirror", output=np.float32, grid_mode=False)
    scipy_seconds = time.process_time() - start
    return separable, scipy_seconds


def time_schedules(cohort: Path, schedules: list[str]) -> dict[str, tuple[float, float]]:
    """Seconds and mean landmark error (mm) per registration schedule, small subject."""
    from drasclr.data.atlas import build_atlas
    from drasclr.data.subject import process_subject
    from drasclr.data.synthetic import map_template_points

    atlas = build_atlas(cohort / "template" / "lung_mask.nii.gz")
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    truth = json.loads((cohort / "truth" / image.name.replace(".nii.gz", ".json")).read_text())
    true_points = map_template_points(truth, atlas.centres_world())
    results = {}
    for schedule in schedules:
        result = process_subject(image, atlas, schedule=schedule)
        found = nib.affines.apply_affine(result.affine, result.landmark_voxels)
        results[schedule] = (result.quality["seconds_register"],
                             float(np.linalg.norm(found - true_points, axis=1).mean()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference", action="store_true")
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
        separable, scipy_seconds = time_resampling(scan)
        print(f"resample to 1 mm (CPU): separable {separable:.2f} s, scipy zoom {scipy_seconds:.2f} s, "
              f"ratio {scipy_seconds / separable:.1f}x")
        small = generate_cohort(folder / "small", 1, seed=0, kind="copd", size="small", workers=1,
                                progress=False)
        schedules = ["fast"] + ([] if args.skip_reference else ["reference"])
        for schedule, (seconds, error) in time_schedules(small, schedules).items():
            print(f"registration {schedule}: {seconds:.1f} s, mean landmark error {error:.2f} mm")


if __name__ == "__main__":
    main()
