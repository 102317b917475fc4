"""The main job, end to end on the built-in synthetic cohorts (``drasclr demo``).

For a COPD cohort: synthetic scans -> atlas landmarks from the template lung mask -> patch
store (segmentation, registration, patch cutting, density measures) -> MoCo pretraining with
the per-landmark memory bank -> subject features of the trained encoder and of a randomly
initialised one -> the paper's subject-level evaluation (readout, survival) against the
density measures -> emphysema subtype detection with a linear probe. The same for a COVID-19
cohort (pretrained on its own scans, as the paper pretrains on MosMed), for the severity task.
Everything ends in one report (``<out>/report/report.html``) and the readout tables printed.

Every stage keeps its outputs under ``--out`` and is skipped (or resumed) when they are
already there, so an interrupted demo picks up where it was. The defaults took 5.5 minutes on
the idle 2-core CPU machine (benchmarks/RESULTS.md); ``--quick`` is a shorter smoke run whose
numbers mean little.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Arm:
    """One cohort's run: its kind, size and pretraining length."""

    kind: str
    subjects: int
    steps: int


#: (COPD arm, COVID arm) of the full demo and of ``--quick``.
FULL = (Arm("copd", 40, 240), Arm("covid", 24, 120))
QUICK = (Arm("copd", 12, 20), Arm("covid", 15, 10))


@dataclass(frozen=True)
class DemoSettings:
    """What ``drasclr demo`` runs (drasclr/cli/demo.py builds it from the flags). None means
    the value of ``FULL`` (or of ``QUICK`` when ``quick``); ``covid_subjects=0`` skips that arm."""

    out: Path = Path("demo_output")
    quick: bool = False
    subjects: int | None = None
    steps: int | None = None
    covid_subjects: int | None = None
    covid_steps: int | None = None
    folds: int | None = None
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "auto"


def run_demo(args: DemoSettings) -> Path:
    """Run the demo; returns the report's path."""
    from drasclr.evaluation.report import format_text_table, write_report
    from drasclr.evaluation.subject import COHORT_SECTION

    copd, covid = QUICK if args.quick else FULL
    copd = Arm("copd", _positive(args.subjects, copd.subjects, "--subjects"),
               _positive(args.steps, copd.steps, "--steps"))
    covid_subjects = covid.subjects if args.covid_subjects is None else args.covid_subjects
    if isinstance(covid_subjects, bool) or covid_subjects < 0:
        raise ValueError(f"--covid-subjects: expected 0 or more, got {covid_subjects!r}")
    covid = Arm("covid", covid_subjects, _positive(args.covid_steps, covid.steps, "--covid-steps"))
    folds = _positive(args.folds, 3 if args.quick else 5, "--folds")
    for arm in (copd, covid):
        if arm.subjects and arm.subjects < 2 * folds:
            raise ValueError(f"{arm.kind} subjects: need at least {2 * folds} for {folds}-fold "
                             f"cross-validation, got {arm.subjects}")
    report_dir = args.out / "report"
    started, timings, sections = time.perf_counter(), {}, []
    atlas_path = args.out / "atlas.npz"
    for arm in (copd, covid):
        if arm.subjects:
            sections += _run_arm(arm, args, atlas_path, report_dir, folds, timings)
    settings = {"copd": vars(copd), "covid": vars(covid), "folds": folds, "seed": args.seed}
    report = write_report(sections, report_dir, settings, title="drasclr demo: evaluation report")

    print()
    for section in sections:
        if not section.title.endswith(COHORT_SECTION):  # its file paths are in the report
            for table in section.tables:
                print(format_text_table(table) + "\n")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {time.perf_counter() - started:.0f}")
    print(f"report: {report}")
    return report


def _run_arm(arm: Arm, args: DemoSettings, atlas_path: Path, report_dir: Path, folds: int,
             timings: dict[str, float]) -> list:
    """One cohort from scans to its report sections; returns them."""
    from drasclr import extract_features, train
    from drasclr.data.atlas import Atlas, build_atlas
    from drasclr.data.preprocess import preprocess
    from drasclr.data.synthetic import generate_cohort
    from drasclr.evaluation import evaluate

    out = args.out / arm.kind
    cohort, store = out / "cohort", out / "store"

    with _stage(f"{arm.kind}: synthetic cohort of {arm.subjects} small subjects -> {cohort}",
                timings, f"{arm.kind} cohort"):
        if not (cohort / "cohort.json").exists():
            generate_cohort(cohort, arm.subjects, seed=args.seed, kind=arm.kind, size="small",
                            workers=args.workers)
        # The template depends only on the size: one atlas serves both cohorts.
        if not atlas_path.exists():
            build_atlas(cohort / "template" / "lung_mask.nii.gz").save(atlas_path)
        atlas = Atlas.load(atlas_path)
        print(f"{atlas.num_landmarks} atlas landmarks")

    with _stage(f"{arm.kind}: segment, register, cut patches, density measures -> {store}",
                timings, f"{arm.kind} preprocess"):
        summary = preprocess(cohort / "images", atlas_path, store, workers=args.workers)
        print(f"{summary.done + summary.skipped} subjects in the store, {summary.failed} failed")

    with _stage(f"{arm.kind}: MoCo pretraining, {arm.steps} steps -> {out / 'train'}",
                timings, f"{arm.kind} pretrain"):
        landmarks_per_batch, queue_size = min(4, atlas.num_landmarks), 64
        result = train(store=str(store), atlas=str(atlas_path), out_dir=str(out / "train"),
                       max_steps=arm.steps, landmarks_per_batch=landmarks_per_batch,
                       batch_size=4 * landmarks_per_batch, queue_size=queue_size,
                       seed=args.seed, device=args.device, tensorboard=False)
        _summarise_training(result.history, queue_size)

    with _stage(f"{arm.kind}: subject features, DrasCLR and random init", timings,
                f"{arm.kind} features"):
        feature_files = [out / "features_drasclr.npz", out / "features_random_init.npz"]
        extract_features(result.checkpoint, store, out=feature_files[0], device=args.device)
        extract_features(result.checkpoint, store, out=feature_files[1], random_init=args.seed,
                         device=args.device)

    with _stage(f"{arm.kind}: evaluation against the density measures", timings,
                f"{arm.kind} evaluate"):
        evaluation = evaluate(feature_files, cohort / "clinical.csv", store, report_dir,
                              folds=folds, seed=args.seed)
        sections = evaluation.sections
        if arm.kind == "copd":
            sections.append(_detection_section(cohort, store, result.checkpoint, folds, args))
    for section in sections:  # both arms share one report
        section.title = f"{arm.kind.upper()}: {section.title}"
    return sections


def _detection_section(cohort: Path, store: Path, checkpoint: Path, folds: int, args):
    """Emphysema subtype detection with the linear probes (the paper's Table 5, first rows)."""
    from drasclr.evaluation.detection import (
        PROBE_DRASCLR, PROBE_RANDOM, DetectionConfig, evaluate_detection)
    from drasclr.evaluation.detection_patches import detection_patches
    from drasclr.checkpoint import load_any_encoder

    data = detection_patches(cohort / "annotations.csv", store)
    encoder, _ = load_any_encoder(checkpoint)
    config = DetectionConfig(folds=folds, seed=args.seed, random_init=args.seed,
                             device=None if args.device == "auto" else args.device)
    result = evaluate_detection(data, encoder, config, methods=[PROBE_DRASCLR, PROBE_RANDOM])
    return result.section()


def _summarise_training(history: list[dict], queue_size: int) -> None:
    first, last = history[0], history[-1]
    chance_loss, chance_top1 = 2 * math.log(1 + queue_size), 1 / (1 + queue_size)
    print(f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {len(history)} steps "
          f"(chance level about {chance_loss:.2f}); top-1 in the last step: local "
          f"{last['local_top1']:.2f}, neighbour {last['neighbour_top1']:.2f} "
          f"(chance {chance_top1:.3f})")


class _stage:
    """Print a stage's heading and add its wall time to ``timings[key]``."""

    def __init__(self, heading: str, timings: dict[str, float], key: str) -> None:
        self.heading, self.timings, self.key = heading, timings, key

    def __enter__(self) -> None:
        print(f"\n== {self.heading}", flush=True)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.key] = time.perf_counter() - self.start


def _positive(value: int | None, default: int, flag: str) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value!r}")
    return value
