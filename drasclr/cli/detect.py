"""``drasclr detect``: emphysema subtype detection, linear probe and fine-tuning (Yu et al.
2023, Table 5), optionally with the label-efficiency curve.

    drasclr detect --annotations cohort/annotations.csv --store store --checkpoint ENC.pt \\
        --out detection [--folds 5] [--epochs 5] [--fractions 0.1,0.2,...,1.0]

Writes into ``--out``: ``detection.md`` (the table, also printed), ``detection.json`` (every
fold's scores and the settings), the heads fitted on all labelled boxes for ``drasclr
densemap`` (``head_<subtype>_probe.pt``, ``head_<subtype>_finetune.pt``), and with
``--fractions`` ``label_efficiency_<subtype>.png``. Test boxes are scored by the paper's voxel
rule (``--rule voxel``: >= 25 % of the box's lung voxels with p > 0.5, every ``--box-step``-th
voxel evaluated) with the centre-patch F1 beside; each head file records the subjects it was
fitted on. A thin layer over :mod:`drasclr.evaluation.detection`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True,
                        help="CSV of subject_id, x_mm, y_mm, z_mm (subject world), label "
                             "(centrilobular | paraseptal | healthy), e.g. a synthetic cohort's "
                             "annotations.csv")
    parser.add_argument("--store", required=True,
                        help="patch store of these subjects (`drasclr preprocess`): their scans "
                             "and saved registrations")
    parser.add_argument("--checkpoint", required=True,
                        help="the DrasCLR encoder: a `drasclr train` checkpoint or an authors' one")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--subtypes", default="centrilobular,paraseptal",
                        help="comma-separated subtypes, each against healthy")
    parser.add_argument("--folds", type=int, default=5, help="subject-disjoint folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="folds, batch order, augmentation")
    parser.add_argument("--random-init", type=int, default=0, metavar="SEED",
                        help="seed of the random-init and scratch encoders (default 0)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning AdamW lr (1e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--no-augment", action="store_true", help="fine-tune without augmentation")
    parser.add_argument("--probe-only", action="store_true",
                        help="only the linear probes and the LAA-950 control (no fine-tuning "
                             "rows, no fine-tuned heads)")
    parser.add_argument("--rule", choices=("voxel", "centre"), default="voxel",
                        help="how a test box is scored: voxel (the paper's: >= 25%% of its lung "
                             "voxels have p > 0.5; the centre-patch F1 as a second column) or "
                             "centre (its centre patch alone)")
    parser.add_argument("--box-step", type=int, default=8, metavar="S",
                        help="voxel rule: evaluate every S-th voxel of a box (and its last) and "
                             "interpolate (1: all 32^3; default 8: 5^3 patches per box)")
    parser.add_argument("--fractions", metavar="F1,F2,...",
                        help="also the label-efficiency curve at these fractions of the training "
                             "boxes, e.g. 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0; every run "
                             "takes the optimisation steps of --epochs over a whole training "
                             "part")
    parser.add_argument("--repeats", type=int, default=1,
                        help="label efficiency: draws of the folds (default 1)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N (default: CUDA if present)")
    parser.add_argument("--cache-dir",
                        help="where the patch cache goes (default <store>/detection_cache)")
    parser.add_argument("--no-cache", action="store_true", help="re-read the scans, write no cache")
    parser.add_argument("--lung-tolerance-mm", type=float, default=5.0,
                        help="a point may lie this far from the segmented lungs (default 5; "
                             "negative: no lung check)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from drasclr.atomic import atomic_write_bytes
    from drasclr.checkpoint_formats import load_encoder
    from drasclr.evaluation.detection import (
        FINETUNE_DRASCLR, FINETUNE_SCRATCH, METHODS, SUBTYPES, DetectionConfig, FineTuneConfig,
        evaluate_detection, save_detection_heads,
    )
    from drasclr.evaluation.detection_efficiency import label_efficiency
    from drasclr.evaluation.detection_patches import detection_patches

    subtypes = [s.strip() for s in args.subtypes.split(",") if s.strip()]
    if not subtypes or set(subtypes) - set(SUBTYPES):
        raise ValueError(f"--subtypes: expected some of {', '.join(SUBTYPES)}, "
                         f"got {args.subtypes!r}")
    fractions = None
    if args.fractions:
        try:
            fractions = [float(f) for f in args.fractions.split(",")]
        except ValueError:
            raise ValueError(f"--fractions: expected comma-separated numbers, "
                             f"got {args.fractions!r}") from None
    config = DetectionConfig(
        folds=args.folds, seed=args.seed, random_init=args.random_init, device=args.device,
        rule=args.rule, box_step=args.box_step,
        finetune=FineTuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, augment=not args.no_augment))
    out = Path(args.out)
    encoder = load_encoder(args.checkpoint)
    data = detection_patches(
        args.annotations, args.store, cache_dir=args.cache_dir, use_cache=not args.no_cache,
        lung_tolerance_mm=None if args.lung_tolerance_mm < 0 else args.lung_tolerance_mm,
        progress=not args.no_progress)
    methods = [m for m in METHODS
               if not (args.probe_only and m in (FINETUNE_DRASCLR, FINETUNE_SCRATCH))]
    result = evaluate_detection(data, encoder, config, subtypes, methods)
    sections = [result.section()]
    curves = {}
    for subtype in subtypes if fractions else []:
        curve = label_efficiency(data, encoder, subtype, fractions, config, args.repeats)
        figure = curve.plot(out / f"label_efficiency_{subtype}.png")
        sections.append(curve.section(figure.name))
        curves[subtype] = curve
    heads = save_detection_heads(data, encoder, out, str(args.checkpoint), config, subtypes,
                                 ("probe",) if args.probe_only else ("probe", "finetune"))

    markdown = "\n\n".join(section_markdown(s) for s in sections) + "\n"
    atomic_write_bytes(out / "detection.md", markdown.encode())
    summary = {
        "annotations": str(args.annotations), "store": str(args.store),
        "checkpoint": str(args.checkpoint), "boxes": len(data), "counts": result.counts,
        "config": {"folds": config.folds, "seed": config.seed, "random_init": config.random_init,
                   "cs": list(config.cs), "rule": config.rule, "box_step": config.box_step,
                   **vars(config.finetune)},
        "scores": {m: {s: {k: list(getattr(v, k).values)
                           for k in ("f1", "precision", "recall", "centre_f1")
                           if getattr(v, k) is not None}
                       for s, v in by.items()} for m, by in result.scores.items()},
        "label_efficiency": {s: {"fractions": list(c.fractions), "steps": c.steps,
                                 "f1": [list(x.f1.values) for x in c.drasclr],
                                 "scratch_f1": list(c.scratch.f1.values),
                                 "matching_fraction": c.matching_fraction,
                                 "all_lesion_f1": c.all_lesion_f1}
                             for s, c in curves.items()},
        "heads": [str(p) for p in heads],
    }
    atomic_write_bytes(out / "detection.json", json.dumps(summary, indent=2).encode())
    print(markdown, end="")
    print(f"{out}: detection.md, detection.json, {len(heads)} head file(s)")
    return 0


def section_markdown(section) -> str:
    """A report section as markdown: heading, intro, tables (Scores as mean ± SD), figures."""
    from drasclr.evaluation.report import Score

    lines = [f"## {section.title}", "", section.intro]
    for table in section.tables:
        lines += ["", f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
                  "|" + " --- |" * len(table.columns)]
        lines += ["| " + " | ".join(c.format() if isinstance(c, Score) else str(c) for c in row)
                  + " |" for row in table.rows]
        if table.note:
            lines += ["", table.note]
    lines += [f"\n![{f.title}]({f.path})" for f in section.figures]
    return "\n".join(lines)
