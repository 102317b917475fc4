"""Emphysema subtype detection: linear probe and fine-tuning (Yu et al. 2023, Table 5).

Two tasks on the boxes of :mod:`drasclr.evaluation.detection_patches`: centrilobular vs
healthy and paraseptal vs healthy. Each is scored by F1, precision and recall of the subtype
(the positive class), mean and SD over ``folds``-fold cross-validation split by subject: no
subject has boxes in both the training and the test part of a fold.

Scoring rule (``DetectionConfig.rule``): ``"voxel"``, the paper's (Section 4.3.1), classifies
the test box voxel by voxel, each voxel by the patch centred on it, and detects the box when
at least 25 % of its lung voxels have probability above 0.5
(:mod:`drasclr.evaluation.detection_voxels`; every ``box_step``-th voxel evaluated, the rest
interpolated). The classifiers are trained on the annotated patches (the box's centre patch)
either way. ``"centre"`` classifies only the centre patch; with the voxel rule its F1 is kept
as a second column ("centre-patch F1"), so the two rules can be compared.

Four methods, the rows of the paper's table, and a density control:

- **Linear probe DrasCLR / random init**: scikit-learn ``StandardScaler`` then
  ``LogisticRegression`` on the frozen representation h; C is chosen by a subject-grouped
  inner cross-validation on the training part only, so the test subjects never influence
  scaling or C.
- **Fine-tune DrasCLR / scratch**: the encoder plus a linear head trained end to end on
  augmented patches (``PatchAugment``, as in pretraining), starting from the DrasCLR weights or
  from a random initialisation, with the same schedule (:class:`FineTuneConfig`).
- **Patch LAA-950 (density control)**: the percentage of the box's lung voxels below -950 HU
  as the only feature of the same scaler + logistic regression, fitted on the training
  folds: what density alone detects.

The models themselves are in :mod:`drasclr.evaluation.detection_models` (re-exported here). A
fitted classifier is written as a head file (:mod:`drasclr.evaluation.head`) for the dense
maps. Runs are deterministic given the seed on
the CPU; on a GPU, cuDNN's algorithms may differ in the last bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from drasclr.evaluation.detection_models import (  # noqa: F401 (re-exported: the module's API)
    DEFAULT_CS, FineTuneConfig, encode_patches, fine_tune, fit_linear_probe, predict_proba,
    probe_weights,
)
from drasclr.evaluation.densemap.scoring import DETECTION_THRESHOLD, detected_by_fraction
from drasclr.evaluation.detection_patches import DetectionPatches
from drasclr.evaluation.detection_voxels import box_features, box_fractions, box_laa950, check_boxes
from drasclr.device import resolve_device
from drasclr.features import calibrate_batchnorm, random_encoder
from drasclr.evaluation.report import Score, Section, Table
from drasclr.intensity import normalise_hu
from drasclr.ranges import (
    AT_LEAST_ONE, COUNT, POSITIVE, Interval, check_fields, check_numbers, ranged,
)

SUBTYPES = ("centrilobular", "paraseptal")
HEALTHY = "healthy"
PROBE_DRASCLR, PROBE_RANDOM = "Linear probe DrasCLR", "Linear probe random init"
FINETUNE_DRASCLR, FINETUNE_SCRATCH = "Fine-tune DrasCLR", "Fine-tune scratch"
PATCH_LAA950 = "Patch LAA-950 (density control)"
METHODS = (PROBE_DRASCLR, PROBE_RANDOM, FINETUNE_DRASCLR, FINETUNE_SCRATCH, PATCH_LAA950)
#: How a test box is scored: the paper's voxel rule, or its centre patch alone.
RULES = ("voxel", "centre")
#: Shuffles of the stratified group split tried before giving up (see ``subject_folds``).
FOLD_ATTEMPTS = 20


@dataclass(frozen=True)
class DetectionConfig:
    """Cross-validation and probe settings; ``device=None`` uses CUDA when present.
    ``random_init`` seeds the weights of the random-init and scratch encoders. ``rule``: how a
    test box is scored (``RULES``); ``box_step``: the voxel rule evaluates every S-th voxel of
    a box and interpolates (1: all 32^3)."""

    folds: int = ranged(5, Interval(2, integer=True))
    seed: int = ranged(0, COUNT)
    random_init: int = ranged(0, COUNT)
    cs: tuple[float, ...] = DEFAULT_CS
    inner_folds: int = ranged(3, Interval(2, integer=True))
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    inference_batch: int = ranged(64, AT_LEAST_ONE)
    device: str | None = None
    rule: str = "voxel"
    box_step: int = ranged(8, Interval(1, 31, integer=True))

    def __post_init__(self) -> None:
        check_fields(self)
        check_numbers("cs", self.cs, POSITIVE)
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {self.rule!r}")

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device or "auto")


@dataclass(frozen=True)
class DetectionScores:
    """F1, precision and recall of the subtype over folds, by the configured rule, and the
    F1 of the centre patch alone when the rule is the voxel one (else None)."""

    f1: Score
    precision: Score
    recall: Score
    centre_f1: Score | None = None

    @classmethod
    def of(cls, folds: Sequence[dict[str, float]]) -> "DetectionScores":
        centre = (Score.of([fold["centre_f1"] for fold in folds])
                  if folds and all("centre_f1" in fold for fold in folds) else None)
        return cls(*(Score.of([fold[name] for fold in folds])
                     for name in ("f1", "precision", "recall")), centre)


def fold_scores(y_true: np.ndarray, centre_p: np.ndarray, box_p: np.ndarray | None = None,
                box_lung: np.ndarray | None = None, box_step: int = 1) -> dict[str, float]:
    """One fold's scores: by the voxel rule on the box maps (probabilities ``box_p`` (N, M) at
    ``box_samples(box_step)``, lung ``box_lung``) with the centre-patch F1 beside, or by the
    centre patches' probabilities ``centre_p`` alone when ``box_p`` is None."""
    centre = binary_scores(y_true, (np.asarray(centre_p) > DETECTION_THRESHOLD).astype(np.int64))
    if box_p is None:
        return centre
    detected = detected_by_fraction(box_fractions(box_p, box_lung, box_step))
    return {**binary_scores(y_true, detected.astype(np.int64)), "centre_f1": centre["f1"]}


def binary_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """F1, precision, recall of the positive class; 0 where undefined (no predicted positive)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="binary", zero_division=0)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall)}


def all_lesion_f1(positive: int, healthy: int) -> float:
    """F1 of calling every box a lesion, 2P / (2P + H): the floor a detector has to clear.
    Detectors that call too much (the voxel rule leans that way) can score near it."""
    return 2 * positive / (2 * positive + healthy)


def task_subset(data: DetectionPatches, subtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of ``data``, y (1 = subtype), subject id per row) of ``subtype`` vs healthy."""
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype: expected one of {SUBTYPES}, got {subtype!r}")
    rows = np.flatnonzero(np.isin(data.labels, (subtype, HEALTHY)))
    return rows, (data.labels[rows] == subtype).astype(np.int64), data.subject_ids[rows]


def subject_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int = 0,
                  task: str = "task") -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds split by subject: (train, test) index arrays, no subject in both.

    Raises:
        ValueError: fewer subjects of either class than folds, or a fold without both classes.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    positive, negative = (len(np.unique(groups[y == label])) for label in (1, 0))
    if min(positive, negative) < n_splits:
        raise ValueError(f"{task}: {n_splits} subject-disjoint folds need at least {n_splits} "
                         f"subjects with each class, found {positive} with the subtype and "
                         f"{negative} healthy; use fewer folds or more subjects")
    # StratifiedGroupKFold balances greedily and can leave a fold without positives when
    # there are about as many positive subjects as folds; the next shuffles usually succeed,
    # so a few are tried in a fixed order (the result still depends only on the seed).
    for attempt in range(FOLD_ATTEMPTS):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True,
                                        random_state=seed + attempt)
        folds = list(splitter.split(np.zeros(len(y)), y, groups))
        if all(len(np.unique(y[part])) == 2 for fold in folds for part in fold):
            return folds
    raise ValueError(f"{task}: no split into {n_splits} subject-disjoint folds gives every fold "
                     f"both classes ({positive} subjects with the subtype, {negative} healthy); "
                     "use fewer folds")


def cross_validate_probe(h: np.ndarray, y: np.ndarray, groups: np.ndarray, folds,
                         config: DetectionConfig, box_h: np.ndarray | None = None,
                         box_lung: np.ndarray | None = None) -> DetectionScores:
    """Linear probe scores over subject-disjoint folds (scaler and C fitted per training part
    on the patches' h). With the box maps' h (``box_h`` (N, M, D), :func:`box_features`) and
    lung (``box_lung``), scored by the voxel rule; else by the centre patch."""
    results = []
    for train, test in folds:
        model = fit_linear_probe(h[train], y[train], groups[train], config.cs,
                                 config.inner_folds, config.seed)
        box_p = None
        if box_h is not None:
            box_p = model.predict_proba(box_h[test].reshape(-1, box_h.shape[-1]))[:, 1]
            box_p = box_p.reshape(len(test), -1)
        results.append(fold_scores(y[test], model.predict_proba(h[test])[:, 1], box_p,
                                   None if box_lung is None else box_lung[test], config.box_step))
    return DetectionScores.of(results)


def cross_validate_finetune(make_encoder: Callable[[], nn.Module], data: DetectionPatches,
                            rows: np.ndarray, y: np.ndarray, folds, config: DetectionConfig,
                            label: str = "positive") -> DetectionScores:
    """Fine-tuning scores over folds; ``make_encoder()`` gives the starting encoder each time.
    The test boxes are scored by ``config.rule``."""
    return DetectionScores.of([score_fine_tuned(make_encoder(), data, rows, y, train, test, config,
                                                label) for train, test in folds])


def score_fine_tuned(start: nn.Module, data: DetectionPatches, rows: np.ndarray, y: np.ndarray,
                     train: np.ndarray, test: np.ndarray, config: DetectionConfig,
                     label: str = "positive") -> dict[str, float]:
    """Fine-tune ``start`` on the boxes ``rows[train]`` and score the boxes ``rows[test]`` by
    ``config.rule`` (:func:`fold_scores`)."""
    device = config.torch_device
    model, head = fine_tune(start, data.patches[rows[train]], data.coords[rows[train]], y[train],
                            config.finetune, config.seed, device, label)
    centre_p = predict_proba(model, head, data.patches[rows[test]], data.coords[rows[test]],
                             config.inference_batch, device)
    if config.rule == "centre":
        return fold_scores(y[test], centre_p)
    box_h = box_features(model, data, rows[test], config.box_step, config.inference_batch, device)
    with torch.no_grad():
        box_p = head.cpu()(torch.from_numpy(box_h)).numpy()
    return fold_scores(y[test], centre_p, box_p, data.box_lung[rows[test]], config.box_step)


def cross_validate_density(laa950: np.ndarray, y: np.ndarray, groups: np.ndarray, folds,
                           config: DetectionConfig) -> DetectionScores:
    """The patch LAA-950 control: the box's LAA-950 as the one feature of the linear probe's
    classifier, fitted on each training part; a box-level prediction (no centre column)."""
    x = np.asarray(laa950, dtype=np.float64).reshape(-1, 1)
    results = []
    for train, test in folds:
        model = fit_linear_probe(x[train], y[train], groups[train], config.cs,
                                 config.inner_folds, config.seed)
        results.append(binary_scores(y[test], model.predict(x[test])))
    return DetectionScores.of(results)


# -- the table -----------------------------------------------------------------------------

@dataclass
class DetectionResult:
    """Scores per method and subtype, and the data behind them (Yu et al. 2023, Table 5)."""

    scores: dict[str, dict[str, DetectionScores]]
    counts: dict[str, dict[str, int]]
    config: DetectionConfig

    def section(self) -> Section:
        """The paper's table: methods x (F1, precision, recall) per subtype, mean ± SD."""
        subtypes = [s for s in SUBTYPES if any(s in by for by in self.scores.values())]
        voxel = self.config.rule == "voxel"
        metrics = ("F1", "precision", "recall") + (("centre-patch F1",) if voxel else ())
        columns = ["Method"] + [f"{s} {m}" for s in subtypes for m in metrics]
        rows = []
        for method, by_subtype in self.scores.items():
            row: list = [method]
            for subtype in subtypes:
                s = by_subtype.get(subtype)
                cells = [s.f1, s.precision, s.recall] if s else ["", "", ""]
                if voxel:
                    cells.append(s.centre_f1 if s and s.centre_f1 is not None else "")
                row += cells
            rows.append(row)
        counted = "; ".join(f"{s}: {c['positive']} boxes vs {c['healthy']} healthy from "
                            f"{c['subjects']} subjects, calling every box a lesion scores F1 "
                            f"{all_lesion_f1(c['positive'], c['healthy']):.2f}"
                            for s, c in self.counts.items())
        rule = (f"a box is detected when >= 25% of its lung voxels have p > 0.5 (every "
                f"{self.config.box_step}th voxel evaluated, the rest interpolated; Yu et al. "
                "2023, Section 4.3.1); centre-patch F1: the centre patch's p > 0.5 alone"
                if voxel else "a box is detected when its centre patch has p > 0.5")
        table = Table("Emphysema subtype detection", columns, rows,
                      note=f"{self.config.folds}-fold cross-validation split by subject, mean ± "
                           f"SD over folds; {rule}; the LAA-950 row is a one-feature density "
                           f"control; {counted}.")
        return Section("Emphysema subtype detection",
                       "Linear probe on frozen representations and end-to-end fine-tuning, each "
                       "subtype against healthy boxes (Yu et al. 2023, Table 5).", [table])


def evaluate_detection(data: DetectionPatches, encoder: nn.Module,
                       config: DetectionConfig = DetectionConfig(),
                       subtypes: Sequence[str] = SUBTYPES,
                       methods: Sequence[str] = METHODS) -> DetectionResult:
    """All methods on all subtypes; the random-init and scratch encoders are
    ``random_encoder(encoder.config, config.random_init)``, the architecture of ``encoder``."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)}, expected some of {METHODS}")
    device = config.torch_device
    voxel = config.rule == "voxel"
    if voxel or PATCH_LAA950 in methods:
        check_boxes(data)
    make_random = lambda: random_encoder(encoder.config, config.random_init)  # noqa: E731
    frozen = {}
    if PROBE_DRASCLR in methods:
        frozen[PROBE_DRASCLR] = encoder
    if PROBE_RANDOM in methods:
        frozen[PROBE_RANDOM] = calibrated_random_encoder(make_random(), data,
                                                         config.inference_batch, device)
    # frozen h of all patches (and box maps), once per encoder, shared by the subtypes
    features, box_h = {}, {}
    for method, frozen_encoder in frozen.items():
        features[method] = encode_patches(frozen_encoder, data.patches, data.coords,
                                          config.inference_batch, device)
        if voxel:
            box_h[method] = box_features(frozen_encoder, data, np.arange(len(data)),
                                         config.box_step, config.inference_batch, device)
    laa950 = box_laa950(data) if PATCH_LAA950 in methods else None
    scores: dict[str, dict[str, DetectionScores]] = {m: {} for m in methods}
    counts = {}
    for subtype in subtypes:
        rows, y, groups = task_subset(data, subtype)
        counts[subtype] = {"positive": int(y.sum()), "healthy": int((y == 0).sum()),
                           "subjects": len(np.unique(groups))}
        folds = subject_folds(y, groups, config.folds, config.seed, f"{subtype} vs healthy")
        for method in methods:
            if method == PATCH_LAA950:
                scores[method][subtype] = cross_validate_density(laa950[rows], y, groups, folds,
                                                                 config)
            elif method in features:
                scores[method][subtype] = cross_validate_probe(
                    features[method][rows], y, groups, folds, config,
                    box_h[method][rows] if voxel else None,
                    data.box_lung[rows] if voxel else None)
            else:
                start = (lambda: encoder) if method == FINETUNE_DRASCLR else make_random
                scores[method][subtype] = cross_validate_finetune(start, data, rows, y, folds,
                                                                  config, subtype)
    return DetectionResult(scores, counts, config)


def calibrated_random_encoder(encoder: nn.Module, data: DetectionPatches, batch_size: int,
                              device: torch.device) -> nn.Module:
    """A random encoder's BatchNorm statistics estimated on the (unlabelled) patches, as for the
    subject-level baseline (``drasclr.features.calibrate_batchnorm``): with the initial
    statistics every patch gets nearly the same h, an unfairly weak frozen baseline."""
    encoder = encoder.to(device)
    batches = ((None, normalise_hu(torch.from_numpy(data.patches[i:i + batch_size]))[:, None]
                .to(device), torch.as_tensor(data.coords[i:i + batch_size], device=device))
               for i in range(0, len(data), batch_size))
    calibrate_batchnorm(encoder, batches, bf16=False)
    return encoder


# -- heads for the dense maps ----------------------------------------------------------------

def save_detection_heads(data: DetectionPatches, encoder: nn.Module, out_dir: str | Path,
                         source: str,
                         config: DetectionConfig = DetectionConfig(),
                         subtypes: Sequence[str] = SUBTYPES,
                         kinds: Sequence[str] = ("probe", "finetune")) -> list[Path]:
    """Fit each subtype's classifier on all its labelled boxes and write head files
    ``head_<subtype>_<kind>.pt`` (:mod:`drasclr.evaluation.head`) for ``drasclr densemap``:
    ``probe`` (linear probe on the frozen ``encoder``, scaler folded into the weights) and
    ``finetune`` (fine-tuned from ``encoder``, its weights saved in the head file). Each
    file records the subjects whose boxes fitted it."""
    from drasclr.evaluation.head import save_head

    unknown = set(kinds) - {"probe", "finetune"}
    if unknown:
        raise ValueError(f"kinds: unknown {sorted(unknown)}, expected probe and/or finetune")
    out_dir = Path(out_dir)
    device = config.torch_device
    h = (encode_patches(encoder, data.patches, data.coords, config.inference_batch, device)
         if "probe" in kinds else None)
    written = []
    for subtype in subtypes:
        rows, y, groups = task_subset(data, subtype)
        if len(np.unique(y)) < 2:
            raise ValueError(f"{subtype} vs healthy: the annotations need boxes of both classes")
        if "probe" in kinds:
            model = fit_linear_probe(h[rows], y, groups, config.cs, config.inner_folds, config.seed)
            weight, bias = probe_weights(model)
            written.append(save_head(out_dir / f"head_{subtype}_probe.pt", weight, bias,
                                     label=subtype, encoder=encoder.config, source=source,
                                     training_subjects=np.unique(groups)))
        if "finetune" in kinds:
            model, head = fine_tune(encoder, data.patches[rows], data.coords[rows], y,
                                    config.finetune, config.seed, device, subtype)
            written.append(save_head(out_dir / f"head_{subtype}_finetune.pt", head.weight,
                                     head.bias, label=subtype, encoder=model.cpu(),
                                     include_encoder_weights=True,
                                     source=f"fine-tuned from {source}",
                                     training_subjects=np.unique(groups)))
    return written
