"""The main job, end to end on the built-in synthetic cohorts (``drasclr demo``).

For a COPD cohort: synthetic scans -> atlas landmarks from the template lung mask -> patch
store (segmentation, registration, patch cutting, density measures) -> MoCo pretraining with
the per-landmark memory bank, once per pretraining seed -> subject features of each trained
encoder and of as many randomly initialised ones -> the paper's subject-level evaluation
(readout, survival, and the control and ceiling rows) against the density measures, every
comparison over the seeds and repeated cross-validation with paired tests
(``drasclr.evaluation.subject``) -> the patch- and voxel-level evaluation: emphysema subtype
detection by linear probes and fine-tuning (Yu et al. 2023, Section 4.3.1, Table 5), label
efficiency (Section 4.3.2, Fig. 5), dense probability maps of held-out subjects scored against
their true lesions (Section 4.3.1, Fig. 3; the paper could not score them) and the ablations of
how location enters the network (Section 4.4, Tables 6-8). The same subject-level evaluation
for a COVID-19 cohort (pretrained on its own scans, as the paper pretrains on MosMed), for the
severity task. Everything ends in one report (``<out>/report/report.html``), whose reading
paragraph is generated from its numbers, and the tables printed.

Three sizes (:class:`Plan`): :data:`DEMO`, the default, sized for about ten minutes on
a 2-core CPU (the COPD arm, the detection probes of the patch-level stages); :data:`FULL`
(``--full``), every arm and stage; :data:`QUICK` (``--quick``), a smoke run whose numbers mean
little. Every stage keeps its outputs under ``--out`` and is skipped (or resumed) when they
are already there, made after its inputs last changed and with the same settings, so an
interrupted demo picks up where it was. The stage times on the 2-core CPU machine are in
benchmarks/RESULTS.md; ``drasclr detect``, ``drasclr densemap`` and ``drasclr ablate`` run
each patch-level part at any size.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Arm:
    """One cohort's run: its kind, size and pretraining length."""

    kind: str
    subjects: int
    steps: int


@dataclass(frozen=True)
class PatchLevel:
    """Sizes of the COPD arm's patch- and voxel-level evaluation."""

    epochs: int  # fine-tuning epochs of detection, label efficiency and the map heads
    fractions: tuple[float, ...]  # label-efficiency fractions of the training boxes
    curve_folds: int  # folds of the label-efficiency curves (each point costs a fine-tuning)
    map_subjects: int  # held-out subjects mapped per subtype
    map_step: int  # every map_step-th voxel computed exactly, the rest interpolated
    ablation_steps: int  # pretraining steps of every ablation variant
    box_step: int  # the voxel rule (Table 5, Fig. 5) evaluates every box_step-th box voxel


# Sized for the 2-core CPU, where the fine-tunings and the box maps of the voxel rule dominate
# (stage times: benchmarks/RESULTS.md). A box step of 16 evaluates 27 voxels of each 32 mm
# box (8: 125, 4.6 times as many encoder passes) and interpolates the rest.
PATCH_LEVEL = PatchLevel(3, (0.1, 0.2, 0.5, 1.0), 3, 2, 4, 60, 16)
QUICK_PATCH_LEVEL = PatchLevel(1, (0.5, 1.0), 2, 1, 8, 4, 16)

#: The patch- and voxel-level stages of the COPD arm: detection by linear probes only, or
#: probes and fine-tuning, label efficiency, dense maps, ablations.
PATCH_STAGES = ("detection_probes", "detection", "label_efficiency", "maps", "ablations")


@dataclass(frozen=True)
class Plan:
    """One size of the demo: the two arms (``subjects=0`` skips one), the pretraining seeds
    (each method's row is over them), the repeated cross-validation and the patch stages."""

    copd: Arm
    covid: Arm
    seeds: int
    folds: int
    repeats: int
    patch_stages: tuple[str, ...]
    patch_level: PatchLevel


DEMO = Plan(Arm("copd", 60, 100), Arm("covid", 0, 120), seeds=3, folds=5, repeats=3,
            patch_stages=("detection_probes",), patch_level=PATCH_LEVEL)
FULL = Plan(Arm("copd", 60, 240), Arm("covid", 24, 120), seeds=3, folds=5, repeats=5,
            patch_stages=PATCH_STAGES[1:], patch_level=PATCH_LEVEL)
QUICK = Plan(Arm("copd", 12, 20), Arm("covid", 15, 10), seeds=3, folds=3, repeats=1,
             patch_stages=("detection_probes",), patch_level=QUICK_PATCH_LEVEL)


@dataclass(frozen=True)
class DemoSettings:
    """What ``drasclr demo`` runs (drasclr/cli/demo.py builds it from the flags). None means
    the value of the plan: ``DEMO``, or ``FULL`` when ``full``, ``QUICK`` when ``quick``;
    ``covid_subjects=0`` skips that arm. ``seed`` seeds the cohorts and the splits; the
    pretraining seeds are ``seed``, ``seed + 1``, ... (and as many random initialisations)."""

    out: Path = Path("demo_output")
    quick: bool = False
    full: bool = False
    subjects: int | None = None
    steps: int | None = None
    covid_subjects: int | None = None
    covid_steps: int | None = None
    folds: int | None = None
    repeats: int | None = None
    seeds: int | None = None
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "auto"


def run_demo(args: DemoSettings) -> Path:
    """Run the demo; returns the report's path."""
    from drasclr.evaluation.report import format_text_table, write_report
    from drasclr.evaluation.subject import COHORT_SECTION, READING_SECTION

    plan = resolve_plan(args)
    report_dir = args.out / "report"
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    timings: dict[str, tuple[float, float]] = {}
    sections = []
    atlas_path = args.out / "atlas.npz"
    for arm in (plan.copd, plan.covid):
        if arm.subjects:
            sections += _run_arm(arm, plan, args, atlas_path, report_dir, timings)
    settings = {"copd": vars(plan.copd), "covid": vars(plan.covid), "pretraining seeds":
                plan.seeds, "folds": plan.folds, "repeats": plan.repeats,
                "patch stages": list(plan.patch_stages), "seed": args.seed}
    report = write_report(sections, report_dir, settings, title="drasclr demo: evaluation report")

    print()
    for section in sections:
        if section.title.endswith(READING_SECTION):
            print(f"{section.title}\n{section.intro}\n")
        elif not section.title.endswith(COHORT_SECTION):  # its file paths are in the report
            for table in section.tables:
                print(format_text_table(table) + "\n")
    print("timings (s wall / s CPU): "
          + ", ".join(f"{k} {wall:.0f}/{cpu:.0f}" for k, (wall, cpu) in timings.items())
          + f"; total {time.perf_counter() - started:.0f}/{_cpu_seconds() - cpu_started:.0f}")
    print(f"report: {report}")
    return report


def resolve_plan(args: DemoSettings) -> Plan:
    """The plan of ``args`` (DEMO, FULL or QUICK) with the sizes the flags override, checked."""
    if args.quick and args.full:
        raise ValueError("--quick and --full: choose one")
    plan = QUICK if args.quick else FULL if args.full else DEMO
    copd = Arm("copd", _positive(args.subjects, plan.copd.subjects, "--subjects"),
               _positive(args.steps, plan.copd.steps, "--steps"))
    covid_subjects = plan.covid.subjects if args.covid_subjects is None else args.covid_subjects
    if isinstance(covid_subjects, bool) or covid_subjects < 0:
        raise ValueError(f"--covid-subjects: expected 0 or more, got {covid_subjects!r}")
    covid = Arm("covid", covid_subjects,
                _positive(args.covid_steps, plan.covid.steps, "--covid-steps"))
    folds = _positive(args.folds, plan.folds, "--folds")
    if folds < 2:
        raise ValueError(f"--folds: need at least 2, got {folds}")
    for arm in (copd, covid):
        if arm.subjects and arm.subjects < 2 * folds:
            raise ValueError(f"{arm.kind} subjects: need at least {2 * folds} for {folds}-fold "
                             f"cross-validation, got {arm.subjects}")
    return replace(plan, copd=copd, covid=covid, folds=folds,
                   repeats=_positive(args.repeats, plan.repeats, "--repeats"),
                   seeds=_positive(args.seeds, plan.seeds, "--seeds"))


def _run_arm(arm: Arm, plan: Plan, args: DemoSettings, atlas_path: Path, report_dir: Path,
             timings: dict[str, tuple[float, float]]) -> list:
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

    seeds = [args.seed + k for k in range(plan.seeds)]
    checkpoints = []
    with _stage(f"{arm.kind}: MoCo pretraining, {arm.steps} steps, seeds "
                f"{', '.join(map(str, seeds))} -> {out / 'train'}", timings, f"{arm.kind} pretrain"):
        landmarks_per_batch, queue_size = min(4, atlas.num_landmarks), 64
        for seed in seeds:
            result = train(store=str(store), atlas=str(atlas_path),
                           out_dir=str(out / "train" / f"seed{seed}"), max_steps=arm.steps,
                           landmarks_per_batch=landmarks_per_batch,
                           batch_size=4 * landmarks_per_batch, queue_size=queue_size,
                           seed=seed, device=args.device, tensorboard=False)
            _summarise_training(result.history, queue_size, seed)
            checkpoints.append(result.checkpoint)

    with _stage(f"{arm.kind}: subject features, DrasCLR and random init, {len(seeds)} seeds each",
                timings, f"{arm.kind} features"):
        features = {"DrasCLR": [], "random init": []}
        for seed, checkpoint in zip(seeds, checkpoints):
            for name, random_init in (("DrasCLR", None), ("random init", seed)):
                path = out / "features" / f"{name.replace(' ', '_').lower()}_seed{seed}.npz"
                if _up_to_date(path, [checkpoint, store / "manifest.csv"]):
                    print(f"kept from an earlier run: {path}")
                else:
                    extract_features(checkpoint, store, out=path, name=name,
                                     random_init=random_init, device=args.device, progress=False)
                features[name].append(path)

    with _stage(f"{arm.kind}: evaluation against the density measures, {plan.repeats} x "
                f"{plan.folds}-fold", timings, f"{arm.kind} evaluate"):
        sections = _kept_sections(
            out / "sections" / "evaluate.json",
            lambda: evaluate(features, cohort / "clinical.csv", store, report_dir,
                             folds=plan.folds, repeats=plan.repeats, seed=args.seed,
                             n_jobs=args.workers).sections,
            inputs=[*features["DrasCLR"], *features["random init"], cohort / "clinical.csv"],
            settings={"folds": plan.folds, "repeats": plan.repeats, "seed": args.seed},
            report_dir=report_dir)
    if arm.kind == "copd" and plan.patch_stages:
        sections += _patch_level_sections(cohort, store, atlas_path, checkpoints[0], out,
                                          report_dir, plan, args, timings)
    for section in sections:  # both arms share one report
        section.title = f"{arm.kind.upper()}: {section.title}"
    return sections


def _patch_level_sections(cohort: Path, store: Path, atlas_path: Path, checkpoint: Path,
                          out: Path, report_dir: Path, plan: Plan, args,
                          timings: dict[str, tuple[float, float]]) -> list:
    """The paper's patch- and voxel-level evaluation of the COPD arm (the first pretraining
    seed's encoder), the stages of ``plan.patch_stages``: subtype detection by probes only or
    probes and fine-tuning (Table 5), label efficiency (Fig. 5), dense maps of held-out
    subjects against their true lesions (Fig. 3) and the ablations (Tables 6-8). Each stage's
    sections are kept in ``out/sections/<stage>.json`` so a re-run skips finished stages."""
    from drasclr.checkpoint_formats import load_encoder
    from drasclr.evaluation.ablation import AblationConfig, run_ablations
    from drasclr.evaluation.densemap import report_sections
    from drasclr.evaluation.detection import (
        PROBE_DRASCLR, PROBE_RANDOM, SUBTYPES, DetectionConfig, FineTuneConfig,
        evaluate_detection)
    from drasclr.evaluation.detection_efficiency import label_efficiency
    from drasclr.evaluation.detection_patches import detection_patches
    from drasclr.evaluation.map_study import held_out_maps

    sizes, folds = plan.patch_level, plan.folds
    annotations = _annotations_in_store(cohort / "annotations.csv", store, out)
    data = detection_patches(annotations, store)
    encoder = load_encoder(checkpoint)
    config = DetectionConfig(folds=folds, seed=args.seed, random_init=args.seed,
                             box_step=sizes.box_step,
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

    probes = (PROBE_DRASCLR, PROBE_RANDOM)
    stages = {
        # The ten-minute demo scores its probes by the centre patch: the paper's voxel rule
        # costs a map of every test box, which the full run (stage "detection") pays.
        "detection_probes": ("subtype detection, linear probes, centre-patch rule (Table 5)",
                             lambda: [evaluate_detection(data, encoder,
                                                         replace(config, rule="centre"),
                                                         methods=probes).section()]),
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
    for name in plan.patch_stages:
        heading, compute = stages[name]
        with _stage(f"copd: {heading}", timings, f"copd {name}"):
            sections += _kept_sections(
                out / "sections" / f"{name}.json", compute,
                inputs=[checkpoint, annotations, store / "manifest.csv"],
                settings={"folds": folds, "seed": args.seed, "patch_level": vars(sizes)},
                report_dir=report_dir)
    return sections


def _annotations_in_store(annotations: Path, store: Path, out: Path) -> Path:
    """The cohort's annotations of the subjects the store holds: a subject that failed
    preprocessing (a registration below the quality threshold, say) has no patches to score,
    and the rest of the demo goes on without its boxes."""
    import csv

    from drasclr.data.store import DONE, PatchStore
    from drasclr.data.synthetic.files import write_csv

    done = {row["subject_id"] for row in PatchStore(store).manifest if row["status"] == DONE}
    with open(annotations, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns, rows = list(reader.fieldnames or []), list(reader)
    kept = [row for row in rows if row["subject_id"] in done]
    if len(kept) == len(rows):
        return annotations
    print(f"{len(rows) - len(kept)} annotated boxes of subjects that failed preprocessing "
          "left out of the patch-level stages")
    path = out / "annotations_in_store.csv"
    write_csv(path, kept, columns)
    return path


def _kept_sections(path: Path, compute, inputs: list[Path], settings: dict,
                   report_dir: Path) -> list:
    """The sections an earlier run kept at ``path``, when it made them with the same
    ``settings`` after the last change of every file in ``inputs`` and their figures are still
    in ``report_dir``; else ``compute()``'s, then kept."""
    from drasclr.evaluation.report import read_results, write_results

    if _up_to_date(path, inputs):
        sections, kept_settings = read_results(path)
        figures = [report_dir / f.path for section in sections for f in section.figures]
        if kept_settings == json.loads(json.dumps(settings)) and all(map(Path.exists, figures)):
            print(f"kept from an earlier run: {path}")
            return sections
    sections = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(sections, path, settings)
    return sections


def _up_to_date(output: Path, inputs: list[Path]) -> bool:
    """Whether ``output`` exists and was written after every file of ``inputs`` last changed
    (a finished training run leaves its checkpoint untouched, a resumed one rewrites it)."""
    return output.exists() and all(output.stat().st_mtime_ns >= Path(p).stat().st_mtime_ns
                                   for p in inputs)


def _summarise_training(history: list[dict], queue_size: int, seed: int) -> None:
    first, last = history[0], history[-1]
    chance_loss, chance_top1 = 2 * math.log(1 + queue_size), 1 / (1 + queue_size)
    print(f"seed {seed}: loss {first['loss']:.3f} -> {last['loss']:.3f} over {len(history)} steps "
          f"(chance level about {chance_loss:.2f}); top-1 in the last step: local "
          f"{last['local_top1']:.2f}, neighbour {last['neighbour_top1']:.2f} "
          f"(chance {chance_top1:.3f})")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers: beside the wall time, what a
    stage costs on a machine other jobs load."""
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


class _stage:
    """Print a stage's heading and record its (wall, CPU) seconds in ``timings[key]``."""

    def __init__(self, heading: str, timings: dict[str, tuple[float, float]], key: str) -> None:
        self.heading, self.timings, self.key = heading, timings, key

    def __enter__(self) -> None:
        print(f"\n== {self.heading}", flush=True)
        self.start, self.cpu = time.perf_counter(), _cpu_seconds()

    def __exit__(self, *exc) -> None:
        wall, cpu = time.perf_counter() - self.start, _cpu_seconds() - self.cpu
        self.timings[self.key] = (wall, cpu)
        print(f"-- {self.key}: {wall:.0f} s wall, {cpu:.0f} CPU s", flush=True)


def _positive(value: int | None, default: int, flag: str) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value!r}")
    return value
