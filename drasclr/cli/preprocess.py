"""``drasclr preprocess``: CT scans -> landmark patch store (segmentation, registration to the
atlas, patches, density measures), a thin layer over :func:`drasclr.data.preprocess.preprocess`.

    drasclr preprocess --images scans/ --atlas atlas.npz --out store/ --workers 4
"""
from __future__ import annotations

import argparse

from drasclr.data.lung_segmentation import SEGMENTATION_METHODS
from drasclr.data.registration import SCHEDULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="folder of CT files / DICOM series folders, or a CSV with subject_id,path")
    parser.add_argument("--atlas", required=True, help="atlas file from `drasclr atlas`")
    parser.add_argument("--out", required=True, help="patch store folder (created or resumed)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--shard", help="i/n: process only shard i (0-based) of n")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="fast",
                        help="registration schedule (default fast)")
    parser.add_argument("--segmentation", choices=SEGMENTATION_METHODS, default="classical",
                        help="lung segmentation method (default classical)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from drasclr.data.preprocess import preprocess

    summary = preprocess(
        args.images, args.atlas, args.out, workers=args.workers, shard=args.shard,
        schedule=args.schedule, segmentation=args.segmentation, progress=not args.no_progress,
    )
    density = ""
    if summary.density_added or summary.density_failed:
        density = (f"; density measures added to {summary.density_added} done subject(s)"
                   + (f", not to {summary.density_failed}" if summary.density_failed else ""))
    damaged = ""
    if summary.damaged:
        damaged = (f"; {len(summary.damaged)} done subject(s) had a damaged patch file and were "
                   f"redone: {', '.join(summary.damaged[:10])}"
                   + (" ..." if len(summary.damaged) > 10 else ""))
    print(
        f"{summary.store}: {summary.done} done, {summary.failed} failed, {summary.skipped} already "
        f"done, of {summary.total} in {summary.seconds:.1f} s{density}{damaged}"
        + (f"; reasons in {summary.store / 'manifest.csv'}"
           if summary.failed or summary.density_failed else "")
    )
    return 1 if summary.failed else 0  # exit 1: some subjects failed
