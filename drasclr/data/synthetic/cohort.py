"""A cohort on disk: per-subject planning, rendering and files, over a process pool.

Subject ``i`` of a cohort draws everything from its own generator seeded by (seed, i, kind),
so a subject does not depend on the cohort size or on the order workers finish in, a resumed
run reproduces the missing subjects exactly, and the same seed gives byte-identical files.
A subject is complete when its ``truth/<id>.json`` exists, which is written after its images;
the cohort-wide tables and ``cohort.json`` (written last) are rebuilt from the truth records.

Two generator versions live side by side (``version=``): version 1 (one shared template
anatomy, density-driven outcomes) reproduces its files byte for byte; version 2 (the default:
per-subject anatomy, several disease processes, site and kernel confounders) is described in
the package docstring and docs/synthetic_cohort.md.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drasclr.data.synthetic.anatomy import SIZES, TemplateAnatomy, size_spec, template_anatomy
from drasclr.data.synthetic.clinical import (
    covid_grade, sample_copd_subject, sample_copd_subject_v2, sample_covid_subject,
    sample_covid_subject_v2,
)
from drasclr.data.synthetic.disease import (
    CENTRILOBULAR, CLE_MIN_DEPTH_MM, COPD_LABELS, COVID_LABELS, PARASEPTAL, paint_covid,
    paint_emphysema,
)
from drasclr.data.synthetic.files import write_csv, write_json, write_nifti
from drasclr.data.synthetic.patterns import add_lobular_arteries, paint_emphysema_patterns
from drasclr.data.synthetic.scanner import (
    Scanner, acquire, field_of_view, protocol_scanner, random_scanner, sample_template,
)
from drasclr.data.synthetic.shape import draw_shape, shape_pose, shape_transform
from drasclr.data.synthetic.subject_anatomy import (
    MOSAIC_HU, MOSAIC_VESSEL_SCALE, add_airways, add_fissures, add_vessels, apply_inspiration,
    atlas_anatomy, chest_geometry, mosaic_mask, normal_lung,
)
from drasclr.data.synthetic.transform import SubjectTransform, random_deformation, random_pose
from drasclr.ranges import AT_LEAST_ONE, COUNT, check_number
from drasclr.worker_exit import die_with_parent

#: Generator version -> the version string its truth records and cohort.json carry.
GENERATOR_VERSIONS = {1: "1.0", 2: "2.0"}
DEFAULT_VERSION = 2
KINDS = ("copd", "covid")
FOLDERS = ("images", "masks", "lesions", "truth", "template")
#: Side of the annotation boxes (the paper's clicked 32 mm boxes).
BOX_MM = 32.0
#: At most this many annotation boxes per subject and label.
BOXES_PER_LABEL = 12

COPD_COLUMNS = [
    "subject_id", "age", "sex", "race", "smoking_status", "pack_years", "fev1pp", "fev1_fvc",
    "gold", "prism", "cle_score", "paraseptal_score", "exacerbation", "survival_time", "death",
    "severity", "laa950_true", "emphysema_true", "centrilobular_true", "paraseptal_true",
    "panlobular_true",
]
COVID_COLUMNS = ["subject_id", "age", "sex", "covid_grade", "involvement_true",
                 "ground_glass_true", "consolidation_true"]
#: Version 2 adds the scan's site and kernel, the BODE components and the other processes'
#: truths (airway wall area %, small-airway disease %, pruned distal vessels %, inspiration).
COPD_COLUMNS_V2 = COPD_COLUMNS + [
    "site", "kernel", "bmi", "mmrc", "walk_m", "bode", "airway_true", "small_airway_true",
    "pruning_true", "inspiration_true",
]
COVID_COLUMNS_V2 = COVID_COLUMNS + ["site", "kernel", "inspiration_true"]
#: Version 2: annotation boxes sit up to this far (mm, per axis) from their lesion's centre,
#: and healthy boxes this far from any lesion.
BOX_JITTER_MM = 2.0
HEALTHY_MARGIN_MM = 4.0
ANNOTATION_COLUMNS = ["subject_id", "label", "x_mm", "y_mm", "z_mm", "i", "j", "k", "box_mm"]


def subject_id(index: int) -> str:
    return f"sub{index:04d}"


def subject_rng(seed: int, index: int, kind: str, version: int = 1) -> np.random.Generator:
    key = [seed, index, KINDS.index(kind)]
    return np.random.default_rng(key if version == 1 else key + [version])


def check_version(version: int) -> int:
    if isinstance(version, bool) or version not in GENERATOR_VERSIONS:
        raise ValueError(f"version must be one of {sorted(GENERATOR_VERSIONS)}, got {version!r}")
    return version


@dataclass(frozen=True)
class SubjectPlan:
    """Every random choice of one subject that needs no rendering."""

    index: int
    kind: str
    size: str
    seed: int
    clinical: dict
    disease: dict
    scanner: Scanner
    transform: SubjectTransform
    rng: np.random.Generator  # continues into rendering (lesions, noise): render a plan once
    version: int = 1
    anatomy: dict | None = None  # version 2: shape parameters


def columns(kind: str, version: int) -> list[str]:
    """clinical.csv's columns for a cohort of ``kind`` and generator ``version``."""
    if version == 1:
        return COPD_COLUMNS if kind == "copd" else COVID_COLUMNS
    return COPD_COLUMNS_V2 if kind == "copd" else COVID_COLUMNS_V2


def sample_clinical(seed: int, index: int, kind: str = "copd",
                    version: int = DEFAULT_VERSION) -> dict:
    """Subject ``index``'s clinical row and disease plan, without pose or rendering.

    These are the first draws of the subject's generator, so they equal the cohort's values.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return _draw_clinical(subject_rng(seed, index, kind, check_version(version)), kind, version)


def _draw_clinical(rng: np.random.Generator, kind: str, version: int) -> dict:
    if version == 1:
        return (sample_copd_subject if kind == "copd" else sample_covid_subject)(rng)
    return (sample_copd_subject_v2 if kind == "copd" else sample_covid_subject_v2)(rng)


def plan_subject(seed: int, index: int, kind: str, size: str,
                 version: int = DEFAULT_VERSION) -> SubjectPlan:
    """Draw a subject's clinical data, disease plan, pose, deformation and scanner."""
    rng = subject_rng(seed, index, kind, check_version(version))
    sample = _draw_clinical(rng, kind, version)
    if version == 2:
        return _plan_v2(seed, index, kind, size, sample, rng)
    spec = size_spec(size)
    pose = random_pose(rng)
    scale = float(np.max(np.linalg.norm(pose[:3, :3], axis=0)))
    scanner = random_scanner(rng, spec, scale)
    transform = random_deformation(rng, pose, field_of_view(scanner), spec.deformation_rms_mm)
    disease = {k: v for k, v in sample.items() if k != "clinical"}
    return SubjectPlan(index, kind, size, seed, sample["clinical"], disease, scanner, transform,
                       rng)


def _plan_v2(seed: int, index: int, kind: str, size: str, sample: dict,
             rng: np.random.Generator) -> SubjectPlan:
    spec = size_spec(size)
    clinical = sample["clinical"]
    emphysema = sum(sample["emphysema_shares"].values()) if kind == "copd" else 0.0
    shape = draw_shape(rng, spec, clinical["sex"], emphysema)
    pose = shape_pose(shape)
    scale = float(np.max(np.linalg.norm(pose[:3, :3], axis=0)))
    scanner = protocol_scanner(rng, spec, scale, clinical["site"], clinical["kernel"])
    transform = shape_transform(rng, shape, spec, field_of_view(scanner), _lung_points(size))
    disease = {k: v for k, v in sample.items() if k != "clinical"}
    return SubjectPlan(index, kind, size, seed, clinical, disease, scanner, transform, rng,
                       version=2, anatomy=shape)


def _lung_points(size: str) -> np.ndarray:
    """Template mm of about 800 lung points, where a mapping's residual is calibrated.

    Every size's chest is the small one scaled (lengths scale with ``SizeSpec.scale``), so the
    small lungs' voxels on a 7 mm grid, scaled, serve every size without building its grid.
    """
    small = chest_geometry("small").template
    voxels = np.argwhere(small.lung[::7, ::7, ::7] > 0) * 7 + small.affine[:3, 3]
    return voxels * (size_spec(size).scale / small.size.scale)


def render_subject(plan: SubjectPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(image int16 HU, lung labels uint8, lesion labels uint8, truth record) of a subject."""
    if plan.version == 2:
        return _render_v2(plan)
    template = template_anatomy(plan.size)
    rng = plan.rng
    if plan.kind == "copd":
        lesions = paint_emphysema(template, plan.disease["emphysema_shares"], rng)
        realised = lesions.fractions(template.lung, COPD_LABELS)
    else:
        lesions = paint_covid(template, plan.disease["involvement"], rng)
        realised = lesions.fractions(template.lung, COVID_LABELS)
    in_lung = template.lung > 0
    laa950_true = float(np.mean(lesions.hu[in_lung] < -950))

    # Lung (2 bits) and lesion labels travel through one nearest-neighbour sampling.
    packed = template.lung | (lesions.labels << 2)
    hu, labels = sample_template(plan.scanner, plan.transform, template.affine, lesions.hu, packed)
    image = acquire(hu, plan.scanner, rng)
    lung, lesion = labels & 3, labels >> 2

    clinical = {"subject_id": subject_id(plan.index), **plan.clinical}
    if plan.kind == "copd":
        clinical.update({"laa950_true": round(100 * laa950_true, 4),
                         "emphysema_true": round(100 * sum(realised.values()), 4)})
        clinical.update({f"{name}_true": round(100 * v, 4) for name, v in realised.items()})
    else:
        involved = sum(realised.values())
        clinical.update({"covid_grade": covid_grade(involved),
                         "involvement_true": round(100 * involved, 4)})
        clinical.update({f"{name}_true": round(100 * v, 4) for name, v in realised.items()})
    truth = {
        "subject_id": subject_id(plan.index), "generator_version": GENERATOR_VERSIONS[1],
        "kind": plan.kind, "size": plan.size, "seed": plan.seed, "index": plan.index,
        **plan.transform.to_dict(),
        "image_affine": plan.scanner.affine.tolist(),
        "scanner": plan.scanner.to_dict(),
        "disease": {**plan.disease, "realised_shares": realised, "laa950_true": laa950_true},
        "lesion_labels": COPD_LABELS if plan.kind == "copd" else COVID_LABELS,
        "clinical": clinical,
        "annotations": _annotations(plan, template, lesions.centres, realised),
    }
    return image, lung, lesion, truth


def _render_v2(plan: SubjectPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Version 2: the subject's own lung tissue and disease on the template grid, then the
    same sampling and scanner path as version 1."""
    geometry = chest_geometry(plan.size)
    base = geometry.template
    rng, disease, in_lung = plan.rng, plan.disease, geometry.in_lung
    hu = normal_lung(geometry, rng)
    grid = TemplateAnatomy(hu, base.lung, base.pleura_distance, base.affine, base.lung_z_range,
                           base.size)
    if plan.kind == "copd":
        lesions = paint_emphysema_patterns(grid, disease["emphysema_shares"], rng)
        hu, keep = lesions.hu, lesions.vessel_keep
        mosaic = mosaic_mask(geometry, disease["small_airway"], rng, lesions.labels == 0)
        hu[mosaic] += MOSAIC_HU
        keep[mosaic] *= MOSAIC_VESSEL_SCALE
        apply_inspiration(hu, in_lung, plan.anatomy["inspiration"])
        add_vessels(hu, geometry, rng, disease["pruning"], keep)
        add_lobular_arteries(hu, base.affine, lesions.arteries)
        add_airways(hu, geometry, rng, disease["wall_area"], disease["lumen_scale"])
        add_fissures(hu, geometry)
        labels, names = lesions.labels, COPD_LABELS
    else:
        apply_inspiration(hu, in_lung, plan.anatomy["inspiration"])
        add_vessels(hu, geometry, rng, 0.0, None)
        add_airways(hu, geometry, rng, 0.6, 1.0)
        add_fissures(hu, geometry)
        lesions = paint_covid(grid, disease["involvement"], rng)  # grid.hu is hu, drawn above
        hu, labels, names = lesions.hu, lesions.labels, COVID_LABELS
    realised = lesions.fractions(base.lung, names)
    laa950_true = float(np.mean(hu[in_lung] < -950))

    packed = base.lung | (labels << 2)
    sampled, packed = sample_template(plan.scanner, plan.transform, base.affine, hu, packed)
    image = acquire(sampled, plan.scanner, rng)
    lung, lesion = packed & 3, packed >> 2

    clinical = {"subject_id": subject_id(plan.index), **plan.clinical}
    if plan.kind == "copd":
        clinical.update({"laa950_true": round(100 * laa950_true, 4),
                         "emphysema_true": round(100 * sum(realised.values()), 4)})
    else:
        involved = sum(realised.values())
        clinical.update({"covid_grade": covid_grade(involved),
                         "involvement_true": round(100 * involved, 4)})
    clinical.update({f"{name}_true": round(100 * v, 4) for name, v in realised.items()})
    clinical["inspiration_true"] = round(plan.anatomy["inspiration"], 4)
    truth = {
        "subject_id": subject_id(plan.index), "generator_version": GENERATOR_VERSIONS[2],
        "kind": plan.kind, "size": plan.size, "seed": plan.seed, "index": plan.index,
        **plan.transform.to_dict(),
        "image_affine": plan.scanner.affine.tolist(),
        "scanner": plan.scanner.to_dict(),
        "anatomy": plan.anatomy,
        "disease": {**disease, "realised_shares": realised, "laa950_true": laa950_true},
        "lesion_labels": names,
        "clinical": clinical,
        "annotations": _annotations_v2(plan, base, lesions.centres, labels),
    }
    return image, lung, lesion, truth


def _annotations_v2(plan: SubjectPlan, template: TemplateAnatomy, centres,
                    labels: np.ndarray) -> list[dict]:
    """Lesion boxes near their lesion's centre, and healthy boxes in every subject.

    Healthy boxes are drawn, away from any lesion, from the same depth and zone preferences
    as the lesion boxes (half as centrilobular, half as paraseptal ones), so depth and zone do
    not tell a lesion box from a healthy one.
    """
    if plan.kind != "copd":
        return []
    rng = plan.rng
    picked: list[tuple[str, np.ndarray]] = []
    for label in (CENTRILOBULAR, PARASEPTAL):
        points = [c for lab, c in centres if lab == label]
        if points:
            keep = rng.choice(len(points), size=min(BOXES_PER_LABEL, len(points)), replace=False)
            picked += [(COPD_LABELS[label], points[i]
                        + rng.uniform(-BOX_JITTER_MM, BOX_JITTER_MM, 3)) for i in sorted(keep)]
    voxels, weights = _healthy_box_weights(plan.size)
    margin = int(np.ceil(HEALTHY_MARGIN_MM))
    healthy = []
    for like_cle in rng.random(BOXES_PER_LABEL) < 0.5:
        weight = weights[0 if like_cle else 1]
        for candidate in rng.choice(len(weight), size=20, p=weight):
            i, j, k = voxels[candidate]
            if not labels[max(i - margin, 0):i + margin + 1, max(j - margin, 0):j + margin + 1,
                          max(k - margin, 0):k + margin + 1].any():
                healthy.append(("healthy", voxels[candidate] + template.affine[:3, 3]))
                break
    return _boxes(plan, picked + healthy)


@functools.lru_cache(maxsize=2)
def _healthy_box_weights(size: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Lung voxels of the version-2 grid and the centrilobular-like and paraseptal-like
    probabilities of a box centre there (the lesion centres' depth and zone preferences)."""
    template = chest_geometry(size).template
    lung_index = np.flatnonzero(template.lung)
    depth = template.pleura_distance.ravel()[lung_index]
    voxels = np.stack(np.unravel_index(lung_index, template.lung.shape), 1)
    zone = template.zone(voxels[:, 2] + template.affine[2, 3])
    cle_depth = CLE_MIN_DEPTH_MM * template.size.scale + 3.0
    weights = (zone**2 * (depth >= cle_depth), (0.5 + zone) * (depth >= 1.0) * (depth <= 4.0))
    return voxels, tuple(w / w.sum() for w in weights)


def _annotations(plan: SubjectPlan, template, centres, realised) -> list[dict]:
    """32 mm boxes on emphysema clusters, or on random lung points of emphysema-free subjects.

    Only boxes that lie wholly inside the image are kept.
    """
    rng = plan.rng
    picked: list[tuple[str, np.ndarray]] = []
    if plan.kind == "copd" and sum(realised.values()) == 0:
        depth_ok = np.flatnonzero(template.pleura_distance.ravel() >= 8.0 * template.size.scale)
        chosen = rng.choice(depth_ok, size=min(BOXES_PER_LABEL, len(depth_ok)), replace=False)
        voxels = np.stack(np.unravel_index(chosen, template.lung.shape), 1)
        picked = [("healthy", v + template.affine[:3, 3]) for v in voxels.astype(float)]
    else:
        for label in (CENTRILOBULAR, PARASEPTAL) if plan.kind == "copd" else ():
            points = [c for lab, c in centres if lab == label]
            if points:
                keep = rng.choice(len(points), size=min(BOXES_PER_LABEL, len(points)),
                                  replace=False)
                picked += [(COPD_LABELS[label], points[i]) for i in sorted(keep)]
    return _boxes(plan, picked)


def _boxes(plan: SubjectPlan, picked: list[tuple[str, np.ndarray]]) -> list[dict]:
    """Annotation rows of (label, template mm) boxes that lie wholly inside the image."""
    if not picked:
        return []
    subject_mm = plan.transform.template_to_subject(np.array([p for _, p in picked]))
    affine = plan.scanner.affine
    voxel = (subject_mm - affine[:3, 3]) / np.diag(affine)[:3]
    low, high = field_of_view(plan.scanner)
    inside = np.all((subject_mm - BOX_MM / 2 >= low) & (subject_mm + BOX_MM / 2 <= high), axis=1)
    return [
        {"subject_id": subject_id(plan.index), "label": label,
         **{f"{a}_mm": round(float(v), 3) for a, v in zip("xyz", point)},
         **{a: int(round(float(v))) for a, v in zip("ijk", index)}, "box_mm": BOX_MM}
        for (label, _), point, index, ok in zip(picked, subject_mm, voxel, inside) if ok
    ]


def _generate_subject(out_dir: Path, seed: int, index: int, kind: str, size: str,
                      version: int) -> str:
    """Render and write one subject; the truth record goes last (it marks completion)."""
    image, lung, lesion, truth = render_subject(plan_subject(seed, index, kind, size, version))
    affine = np.asarray(truth["image_affine"])
    name = subject_id(index)
    write_nifti(out_dir / "images" / f"{name}.nii.gz", image, affine)
    write_nifti(out_dir / "masks" / f"{name}.nii.gz", lung, affine)
    write_nifti(out_dir / "lesions" / f"{name}.nii.gz", lesion, affine)
    write_json(out_dir / "truth" / f"{name}.json", truth)
    return name


def _is_complete(out_dir: Path, name: str, seed: int, kind: str, size: str,
                 version: int) -> bool:
    """True when the subject's files exist from the same generator, seed, kind and size."""
    truth_path = out_dir / "truth" / f"{name}.json"
    if not truth_path.exists():
        return False
    try:
        truth = json.loads(truth_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    found = (truth.get("generator_version"), truth.get("seed"), truth.get("kind"),
             truth.get("size"))
    wanted = (GENERATOR_VERSIONS[version], seed, kind, size)
    if found != wanted:
        raise ValueError(
            f"{out_dir}: already holds a cohort (version, seed, kind, size) = {found}, not "
            f"{wanted}; use another --out folder"
        )
    return all((out_dir / folder / f"{name}.nii.gz").exists()
               for folder in ("images", "masks", "lesions"))


def _check_arguments(out_dir, subjects, seed, kind, size, workers, version) -> Path:
    check_number("subjects", subjects, AT_LEAST_ONE)
    check_version(version)
    check_number("seed", seed, COUNT)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if workers is not None:
        check_number("workers", workers, AT_LEAST_ONE)
    out_dir = Path(out_dir)
    try:
        for folder in FOLDERS:
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "truth" / ".write-check.json", {})
        (out_dir / "truth" / ".write-check.json").unlink()
    except OSError as error:
        raise ValueError(f"{out_dir}: cannot write the cohort there "
                         f"({error.strerror or error})") from error
    return out_dir


def generate_cohort(
    out_dir: str | os.PathLike,
    subjects: int,
    seed: int = 0,
    kind: str = "copd",
    size: str = "full",
    workers: int | None = None,
    progress: bool = True,
    version: int = DEFAULT_VERSION,
) -> Path:
    """Write a synthetic cohort (layout in the package docstring); resumes an interrupted run.

    Args:
        out_dir: destination folder (created).
        subjects: number of subjects, ids ``sub0000`` ... .
        seed: cohort seed; the same seed, kind and size give byte-identical files.
        kind: ``"copd"`` (emphysema subtypes, spirometry, survival) or ``"covid"``.
        size: ``"full"`` (about 370 x 260 x 270 voxels of 0.65-0.8 x 0.8-1.25 mm) or
            ``"small"`` (a half-size chest, about 115 x 105 x 105 voxels of 1.2-1.6 mm).
        workers: processes; None uses all cores.
        progress: show a tqdm progress bar.
        version: generator version: 2 (default; per-subject anatomy, several disease
            processes, site and kernel confounders) or 1 (the first generator, kept byte for
            byte reproducible).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: bad arguments, an unwritable folder, or a folder holding another cohort.
    """
    from tqdm import tqdm

    out_dir = _check_arguments(out_dir, subjects, seed, kind, size, workers, version)
    # Built before forking, so workers inherit it.
    template = template_anatomy(size) if version == 1 else atlas_anatomy(size)
    write_nifti(out_dir / "template" / "image.nii.gz",
                np.rint(template.hu).astype(np.int16), template.affine)
    write_nifti(out_dir / "template" / "lung_mask.nii.gz", template.lung, template.affine)

    pending = [i for i in range(subjects)
               if not _is_complete(out_dir, subject_id(i), seed, kind, size, version)]
    workers = min(workers or os.cpu_count() or 1, max(len(pending), 1))
    with tqdm(total=subjects, initial=subjects - len(pending), desc="synth", unit="subject",
              disable=not progress) as bar:
        if workers == 1:
            for index in pending:
                _generate_subject(out_dir, seed, index, kind, size, version)
                bar.update()
        else:
            context = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                futures = [pool.submit(_generate_subject, out_dir, seed, i, kind, size,
                                       version)
                           for i in pending]
                for future in as_completed(futures):
                    future.result()
                    bar.update()

    truths = [json.loads((out_dir / "truth" / f"{subject_id(i)}.json").read_text())
              for i in range(subjects)]
    write_csv(out_dir / "clinical.csv", [t["clinical"] for t in truths], columns(kind, version))
    write_csv(out_dir / "annotations.csv", [a for t in truths for a in t["annotations"]],
              ANNOTATION_COLUMNS)
    write_json(out_dir / "cohort.json", {
        "generator": "drasclr.data.synthetic", "generator_version": GENERATOR_VERSIONS[version],
        "seed": seed, "kind": kind, "subjects": subjects, "size": size,
        "subject_ids": [subject_id(i) for i in range(subjects)],
        "template": {"image": "template/image.nii.gz", "lung_mask": "template/lung_mask.nii.gz",
                     "spacing_mm": 1.0, "extent_mm": list(size_spec(size).template_extent_mm)},
    })
    return out_dir
