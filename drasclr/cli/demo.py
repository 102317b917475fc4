"""``drasclr demo``: the main job end to end on the built-in synthetic cohorts, a thin layer over
:func:`drasclr.demo.run_demo`.

    drasclr demo --out demo_output [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from drasclr.demo import FULL, QUICK, DemoSettings, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Stages: synthetic cohort, atlas, patch store, pretraining, features, the subject-level "
        "evaluation; for the COPD cohort also subtype detection (probes and fine-tuning), label "
        "efficiency, dense maps of held-out subjects scored against their true lesions and the "
        "ablations. Each stage is kept under --out and skipped on a re-run; the report is "
        "<out>/report/report.html. Stage times on a 2-core CPU: benchmarks/RESULTS.md.")
    defaults = DemoSettings()
    parser.add_argument("--out", type=Path, default=defaults.out,
                        help=f"output folder (default {defaults.out})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short smoke run: {QUICK[0].subjects} + {QUICK[1].subjects} "
                             f"subjects, {QUICK[0].steps} + {QUICK[1].steps} steps, 3 folds")
    parser.add_argument("--subjects", type=int, help=f"COPD subjects (default {FULL[0].subjects})")
    parser.add_argument("--steps", type=int,
                        help=f"COPD pretraining steps (default {FULL[0].steps})")
    parser.add_argument("--covid-subjects", type=int,
                        help=f"COVID-19 subjects (default {FULL[1].subjects}; 0 skips that arm)")
    parser.add_argument("--covid-steps", type=int,
                        help=f"COVID-19 pretraining steps (default {FULL[1].steps})")
    parser.add_argument("--folds", type=int, help="cross-validation folds (default 5, quick 3)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of cohorts, training, folds (default 0)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="worker processes for cohort generation and preprocessing "
                             "(default: all cores)")
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"),
                        help="where the encoder runs (default auto: CUDA when present)")


def run(args: argparse.Namespace) -> int:
    run_demo(DemoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings)}))
    return 0
