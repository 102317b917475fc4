"""``drasclr synth``: a synthetic chest-CT cohort with its clinical table, a thin layer over
:func:`drasclr.data.synthetic.generate_cohort`.

    drasclr synth --out cohort/ --subjects 40 --kind copd --size small [--version 2]
"""
from __future__ import annotations

import argparse

from drasclr.data.synthetic.anatomy import SIZES
from drasclr.data.synthetic.cohort import DEFAULT_VERSION, GENERATOR_VERSIONS, KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="destination folder of the cohort")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--kind", choices=KINDS, default="copd",
                        help="copd (COPDGene-like tasks) or covid (severity grades); default copd")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: scans of the usual size; small: half the resolution, for "
                             "tests and the demo (default full)")
    parser.add_argument("--version", type=int, choices=sorted(GENERATOR_VERSIONS),
                        default=DEFAULT_VERSION, dest="generator_version",
                        help="generator version: 2 (per-subject anatomy, airway and small-airway "
                             "disease, site and kernel confounders) or 1 (the first generator, "
                             f"reproduced byte for byte); default {DEFAULT_VERSION}")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from drasclr.data.synthetic import generate_cohort

    out = generate_cohort(args.out, args.subjects, seed=args.seed, kind=args.kind,
                          size=args.size, workers=args.workers, progress=not args.no_progress,
                          version=args.generator_version)
    print(f"wrote {args.subjects} {args.kind} subjects ({args.size}, version "
          f"{args.generator_version}) to {out}")
    return 0
