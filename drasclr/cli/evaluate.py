"""``drasclr evaluate``: the subject-level evaluation of Yu et al. 2023 (Tables 2 to 4).

    drasclr evaluate --features drasclr.npz --features random.npz --clinical clinical.csv \\
        --store STORE --out REPORT_DIR

A thin layer over :func:`drasclr.evaluation.evaluate`; prints the tables and the report's path.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", action="append", required=True, metavar="FEATURES.npz",
                        help="subject features file from `drasclr features`; repeat the flag to "
                             "compare several: each name is a row of the tables, and files of "
                             "one name are that method's pretraining seeds (the first name is "
                             "the method the report's reading is about)")
    parser.add_argument("--clinical", required=True,
                        help="clinical table (CSV with subject_id and the label columns, e.g. "
                             "the synthetic cohort's clinical.csv); covid_grade present: COVID-19 "
                             "severity, else the COPD tasks")
    parser.add_argument("--store", required=True,
                        help="the patch store the features came from (its manifest holds the "
                             "density measures, the baseline rows)")
    parser.add_argument("--out", required=True,
                        help="report folder: report.html, report.md, results.json, figures/")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeated cross-validations of every task, the same splits for "
                             "every row (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every split (default 0)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="only these tasks (log_fev1pp log_fev1_fvc gold cle paraseptal "
                             "exacerbation survival covid_grade); default: every task the "
                             "clinical table has columns for")


def run(args: argparse.Namespace) -> int:
    from drasclr.evaluation import evaluate
    from drasclr.evaluation.report import format_text_table

    result = evaluate(args.features, args.clinical, args.store, args.out, folds=args.folds,
                      repeats=args.repeats, seed=args.seed, tasks=args.tasks)
    print(f"\n{result.reading}")
    for section in result.sections[2:]:
        for table in section.tables:
            print(f"\n{format_text_table(table)}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nreport: {result.report}")
    return 0
