"""``drasclr demo``: the main job end to end on the built-in synthetic cohorts, a thin layer over
:func:`drasclr.demo.run_demo`.

    drasclr demo --out demo_output [--full | --quick]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from drasclr.demo import DEMO, FULL, QUICK, DemoSettings, run_demo


def _describe(plan) -> str:
    covid = f" + {plan.covid.subjects} COVID-19" if plan.covid.subjects else ""
    return (f"{plan.copd.subjects} COPD{covid} subjects, {plan.copd.steps} pretraining steps x "
            f"{plan.seeds} seeds, {plan.repeats} x {plan.folds}-fold cross-validation, patch "
            f"stages: {', '.join(plan.patch_stages)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Stages: synthetic cohort, atlas, patch store, pretraining (once per seed), features, "
        "the subject-level evaluation (readout, survival, scanner readout, paired tests, a "
        "reading generated from the numbers); for the COPD cohort also the patch-level stages: "
        "subtype detection (probes; with --full also fine-tuning), and with --full label "
        "efficiency, dense maps of held-out subjects scored against their true lesions and the "
        "ablations. Each stage is kept under --out and skipped on a re-run; the report is "
        "<out>/report/report.html. Stage times on a 2-core CPU: benchmarks/RESULTS.md.")
    defaults = DemoSettings()
    parser.add_argument("--out", type=Path, default=defaults.out,
                        help=f"output folder (default {defaults.out})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help=f"every arm and stage: {_describe(FULL)} (default: {_describe(DEMO)})")
    size.add_argument("--quick", action="store_true",
                      help=f"a short smoke run whose numbers mean little: {_describe(QUICK)}")
    parser.add_argument("--subjects", type=int, help="COPD subjects")
    parser.add_argument("--steps", type=int, help="COPD pretraining steps (per seed)")
    parser.add_argument("--covid-subjects", type=int, help="COVID-19 subjects (0 skips that arm)")
    parser.add_argument("--covid-steps", type=int, help="COVID-19 pretraining steps (per seed)")
    parser.add_argument("--seeds", type=int,
                        help="pretraining seeds (and random initialisations) per method")
    parser.add_argument("--folds", type=int, help="cross-validation folds")
    parser.add_argument("--repeats", type=int, help="repeated cross-validations")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the cohorts and the splits; pretraining seeds are SEED, "
                             "SEED+1, ... (default 0)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="worker processes for cohort generation and preprocessing "
                             "(default: all cores)")
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"),
                        help="where the encoder runs (default auto: CUDA when present)")


def run(args: argparse.Namespace) -> int:
    run_demo(DemoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings)}))
    return 0
