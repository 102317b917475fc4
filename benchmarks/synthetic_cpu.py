"""CPU seconds of the synthetic cohort's generator versions, for a loaded machine.

Wall times on the shared VM move with the other jobs; the CPU seconds of one pinned core move
far less. Run:

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_cpu.py small 6
    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_cpu.py full 2

- render: plan + render (no files) of subjects 1, 2, ... with version 1 and version 2 back to
  back in each round; prints the medians and the per-round version 2 / version 1 ratio;
- with size small, also the per-subject work of tests/test_synthetic_v2.py's 200-subject
  fixture (render, density measures, box depths) and what 200 subjects cost on 2 free cores.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from drasclr.data.synthetic import plan_subject, render_subject
from drasclr.data.synthetic.anatomy import template_anatomy
from drasclr.data.synthetic.subject_anatomy import chest_geometry


def cpu_seconds(run) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main(size: str, rounds: int) -> None:
    template_anatomy(size)  # the shared grids, built once per process
    chest_geometry(size)
    chest_geometry("small")
    for version in (1, 2):  # warm-up
        render_subject(plan_subject(0, 1, "copd", size, version=version))
    cpu = {1: [], 2: []}
    for r in range(rounds):
        for version in (1, 2):
            cpu[version].append(cpu_seconds(
                lambda: render_subject(plan_subject(0, 1 + r, "copd", size, version=version))))
    ratios = [b / a for a, b in zip(cpu[1], cpu[2])]
    print(f"render {size}: version 1 median {statistics.median(cpu[1]):.3f} s, version 2 median "
          f"{statistics.median(cpu[2]):.3f} s (min {min(cpu[2]):.3f}); version 2 / version 1 "
          f"per round {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x, "
          f"{rounds} rounds)")
    if size == "small":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_synthetic_v2 import COHORT, _summary

        _summary(0)
        per_subject = [cpu_seconds(lambda: _summary(i)) for i in range(1, 11)]
        mean = statistics.mean(per_subject)
        print(f"200-subject test, per subject: mean {mean:.3f} s (min {min(per_subject):.3f}, "
              f"max {max(per_subject):.3f}); {COHORT} subjects on 2 free cores: "
              f"{COHORT * mean / 2:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 6)
