"""``drasclr ablate --config ABLATION.yaml --report REPORT_DIR``: the paper's ablations
(Yu et al. 2023, Section 4.4), a thin layer over :mod:`drasclr.evaluation.ablation`."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="YAML file: store, atlas, clinical, out, optional annotations, "
                             "shared train settings and the values each study compares "
                             "(see examples/ablation.yaml)")
    parser.add_argument("--report", help="write the tables as a report in this folder "
                                         "(default: <out>/report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drasclr.evaluation.ablation import AblationConfig, run_ablations, studies_of
    from drasclr.evaluation.report import format_text_table, write_report

    config = AblationConfig.load(args.config)
    print(f"ablation studies: {', '.join(studies_of(config))} -> {config.out}")
    sections = run_ablations(config, progress=not args.no_progress)
    report = Path(args.report) if args.report else Path(config.out) / "report"
    paths = write_report(sections, report, settings={"config": str(Path(args.config).resolve()),
                                                     **vars(config)})
    for section in sections:
        for table in section.tables:
            print("\n" + format_text_table(table))
    print(f"\nreport: {paths['html']}")
    return 0
