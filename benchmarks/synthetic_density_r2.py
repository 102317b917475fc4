"""How well single measures predict log FEV1pp in the 200-subject version-2 test cohort.

    nice .venv/bin/python benchmarks/synthetic_density_r2.py

Renders tests/test_synthetic_v2.py's cohort (200 small subjects, seed 11, no files) in two
processes and prints the 5-fold cross-validated R^2 of a linear fit of log FEV1pp on each
density measure (measured on the images inside the true lung masks) and on each truth column;
also the GOLD counts, death and exacerbation rates.
"""
from __future__ import annotations

import collections
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_synthetic_v2 import COHORT, _cv_r2, _summary  # noqa: E402

from drasclr.data.density import COPD_DENSITY  # noqa: E402

TRUTHS = ("emphysema_true", "laa950_true", "airway_true", "small_airway_true", "severity")


def main() -> None:
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        summary = list(pool.map(_summary, range(COHORT), chunksize=5))
    print(f"{COHORT} subjects rendered in {time.perf_counter() - start:.0f} s wall")
    y = np.log([s["clinical"]["fev1pp"] for s in summary])
    for name in COPD_DENSITY:
        print(f"{name:24s} R2 {_cv_r2([s['density'][name] for s in summary], y):.3f}")
    for name in TRUTHS:
        print(f"{name:24s} R2 {_cv_r2([s['clinical'][name] for s in summary], y):.3f}")
    every = [[s["clinical"][c] for c in TRUTHS[:1] + TRUTHS[2:4]] for s in summary]
    print(f"{'emphysema+airway+small':24s} R2 {_cv_r2(every, y):.3f}")
    print("GOLD", dict(sorted(collections.Counter(s["clinical"]["gold"] for s in summary).items())),
          "death", np.mean([s["clinical"]["death"] for s in summary]),
          "exacerbation", np.mean([s["clinical"]["exacerbation"] for s in summary]))


if __name__ == "__main__":
    main()
