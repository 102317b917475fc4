"""End-to-end preprocessing speed: seconds per full-size subject per core.

One worker process (one core, one ITK thread) runs the whole pipeline: read, resample to
1 mm, segment, register to the atlas, cut the patches, write the store. Reported per subject:
wall seconds, CPU seconds of the worker (the cost per core, robust to a busy machine) and the
stages' wall seconds. Compared in the same
run: the ``fast`` registration schedule (the default) and, with ``--reference``, the
authors' schedule (docs/method.md#registration), far slower.

    .venv/bin/python benchmarks/bench_preprocess.py [--subjects 2] [--reference]
    make bench                                          # pytest-benchmark timing, fast only
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from drasclr.data.atlas import build_atlas
from drasclr.data.preprocess import preprocess


def make_cohort(folder: Path, subjects: int) -> Path:
    """Full-size synthetic subjects and their atlas; returns the atlas file."""
    from drasclr.data.synthetic import generate_cohort

    generate_cohort(folder / "cohort", subjects, seed=0, kind="copd", size="full")
    atlas_path = folder / "atlas.npz"
    build_atlas(folder / "cohort" / "template" / "lung_mask.nii.gz").save(atlas_path)
    return atlas_path


def seconds_per_subject(folder: Path, atlas_path: Path, schedule: str) -> dict[str, float]:
    """Mean per-subject wall seconds, CPU seconds and stage seconds, from the manifest."""
    out = folder / f"store_{schedule}"
    summary = preprocess(folder / "cohort" / "images", atlas_path, out, workers=1,
                         schedule=schedule, progress=False)
    with open(out / "manifest.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["status"] == "done"]
    if summary.failed or not rows:
        raise RuntimeError(f"{summary.failed} subjects failed; see {out / 'manifest.csv'}")
    columns = [name for name in rows[0] if name.startswith(("seconds", "cpu_seconds"))]
    return {name: sum(float(row[name]) for row in rows) / len(rows) for name in columns}


def test_end_to_end_fast_schedule(benchmark, tmp_path):
    atlas_path = make_cohort(tmp_path, 1)
    benchmark.pedantic(lambda: seconds_per_subject(tmp_path, atlas_path, "fast"),
                       setup=lambda: None, rounds=1, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also time the reference schedule")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        atlas_path = make_cohort(folder, args.subjects)
        results = {"fast": seconds_per_subject(folder, atlas_path, "fast")}
        if args.reference:
            results["reference"] = seconds_per_subject(folder, atlas_path, "reference")
        for schedule, means in results.items():
            print(f"{schedule} ({args.subjects} subjects, 1 worker, means per subject): "
                  + ", ".join(f"{name} {value:.1f}" for name, value in means.items()))
        if args.reference:
            for name in ("seconds", "cpu_seconds"):
                ratio = results["reference"][name] / results["fast"][name]
                print(f"reference / fast, {name}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
