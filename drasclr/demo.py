"""The main job, end to end on the built-in synthetic cohorts (``drasclr demo``).

For a COPD cohort: synthetic scans -> atlas landmarks from the template lung mask -> patch
store (segmentation, registration, patch cutting, density measures) -> MoCo pretraining with
the per-landmark memory bank -> subject features of the trained encoder and of a randomly
initialised one -> the paper's subject-level evaluation (readout, survival) against the
density measures -> the patch- and voxel-level evaluation: emphysema subtype detection by
linear probes and fine-tuning (Yu et al. 2023, Section 4.3.1, Table 5), label efficiency
(Section 4.3.2, Fig. 5), dense probability maps of held-out subjects scored against their true
lesions (Section 4.3.1, Fig. 3; the paper could not score them) and the ablations of how
location enters the network (Section 4.4, Tables 6-8).
The same subject-level evaluation for a COVID-19 cohort (pretrained on its own scans, as the
paper pretrains on MosMed), for the severity task. Everything ends in one report
(``<out>/report/report.html``) and the tables printed.

Every stage keeps its outputs under ``--out`` and is skipped (or resumed) when they are
already there, so an interrupted demo picks up where it was. The stage times on the 2-core CPU
machine are in benchmarks/RESULTS.md; the patch-level sizes (:data:`PATCH_LEVEL`) are small for
that machine, and ``drasclr detect``, ``drasclr densemap`` and ``drasclr ablate`` run each part
at any size. ``--quick`` is a shorter smoke run whose numbers mean little.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
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
class PatchLevel:
    """Sizes of the COPD arm's patch- and voxel-level evaluation."""

    epochs: int  # fine-tuning epochs of detection, label efficiency and the map heads
    fractions: tuple[float, ...]  # label-efficiency fractions of the training boxes
    curve_folds: int  # folds of the label-efficiency curves (each point costs a fine-tuning)
    map_subjects: int  # held-out subjects mapped per subtype
    map_step: int  # every map_step-th voxel computed exactly, the rest interpolated
    ablation_steps: int  # pretraining steps of every ablation variant


# Sized for the 2-core CPU, where the fine-tunings dominate (stage times: benchmarks/RESULTS.md).
PATCH_LEVEL = PatchLevel(3, (0.1, 0.2, 0.5, 1.0), 3, 2, 4, 60)
QUICK_PATCH_LEVEL = PatchLevel(1, (0.5, 1.0), 2, 1, 8, 4)


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
        sizes = QUICK_PATCH_LEVEL if args.quick else PATCH_LEVEL
        sections += _patch_level_sections(cohort, store, atlas_path, result.checkpoint, out,
                                          report_dir, sizes, folds, args, timings)
    for section in sections:  # both arms share one report
        section.title = f"{arm.kind.upper()}: {section.title}"
    return sections


def _patch_level_sections(cohort: Path, store: Path, atlas_path: Path, checkpoint: Path,
                          out: Path, report_dir: Path, sizes: PatchLevel, folds: int, args,
                          timings: dict[str, float]) -> list:
    """The paper's patch- and voxel-level evaluation of the COPD arm, one stage each: subtype
    detection (Table 5), label efficiency (Fig. 5), dense maps of held-out subjects against
    their true lesions (Fig. 3) and the ablations (Tables 6-8). Each stage's sections are
    kept in ``out/sections/<stage>.json`` so a re-run skips finished stages."""
    from drasclr.checkpoint_formats import load_encoder
    from drasclr.evaluation.ablation import AblationConfig, run_ablations
    from drasclr.evaluation.densemap import report_sections
    from drasclr.evaluation.detection import (
        SUBTYPES, DetectionConfig, FineTuneConfig, evaluate_detection)
    from drasclr.evaluation.detection_efficiency import label_efficiency
    from drasclr.evaluation.detection_patches import detection_patches
    from drasclr.evaluation.map_study import held_out_maps

    annotations = cohort / "annotations.csv"
    data = detection_patches(annotations, store)
    encoder = load_encoder(checkpoint)
    config = DetectionConfig(folds=folds, seed=args.seed, random_init=args.seed,
                             finetune=FineTuneConfig(epochs=sizes.epochs),
                             device=None if args.device == "auto" else args.device)

    def curves() -> list:
        sections = []
        for subtype in SUBTYPES:
            curve = label_efficiency(data, encoder, subtype, sizes.fractions,
                                     replace(config, folds=sizes.curve_folds))
            name = f"detection/label_efficiency_{subtype}.png"
            curve.plot(report_dir / name)
            sections.append(curve.section(name))
        return sections

    def maps() -> list:
        evaluations = held_out_maps(data, encoder, cohort, store, out / "maps", annotations,
                                    config, subjects=sizes.map_subjects, step=sizes.map_step)
        return report_sections(evaluations, report_dir)

    def ablations() -> list:
        train = {"max_steps": sizes.ablation_steps, "batch_size": 16, "landmarks_per_batch": 4,
                 "queue_size": 64, "device": args.device}
        return run_ablations(AblationConfig(
            str(store), str(atlas_path), str(cohort / "clinical.csv"), str(out / "ablation"),
            str(annotations), train, folds=folds, seed=args.seed))

    stages = {
        "detection": ("subtype detection, linear probes and fine-tuning (Table 5)",
                      lambda: [evaluate_detection(data, encoder, config).section()]),
        "label_efficiency": (f"label efficiency at {', '.join(f'{f:g}' for f in sizes.fractions)}"
                             " of the training boxes (Fig. 5)", curves),
        "maps": (f"dense maps of {sizes.map_subjects} held-out subject(s) per subtype, step "
                 f"{sizes.map_step}, against their true lesions (Fig. 3)", maps),
        "ablations": (f"ablations, every variant pretrained {sizes.ablation_steps} steps "
                      "(Tables 6-8)", ablations),
    }
    sections = []
    for name, (heading, compute) in stages.items():
        with _stage(f"copd: {heading}", timings, f"copd {name}"):
            sections += _kept_sections(out / "sections" / f"{name}.json", compute)
    return sections


def _kept_sections(path: Path, compute) -> list:
    """The sections kept at ``path`` by an earlier run, else ``compute()``'s, then kept."""
    from drasclr.evaluation.report import read_results, write_results

    if path.exists():
        print(f"kept from an earlier run: {path}")
        return read_results(path)[0]
    sections = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(sections, path, {})
    return sections


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
