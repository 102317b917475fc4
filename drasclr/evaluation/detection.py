"""Emphysema subtype detection: linear probe and fine-tuning (Yu et al. 2023, Table 5).

Two tasks on the boxes of :mod:`drasclr.evaluation.detection_patches`: centrilobular vs
healthy and paraseptal vs healthy. Each is scored by F1, precision and recall of the subtype
(the positive class), mean and SD over ``folds``-fold cross-validation split by subject: no
subject has boxes in both the training and the test part of a fold. Four methods, the rows of
the paper's table:

- **Linear probe DrasCLR / random init**: scikit-learn ``StandardScaler`` then
  ``LogisticRegression`` on the frozen representation h; C is chosen by a subject-grouped
  inner cross-validation on the training part only, so the test subjects never influence
  scaling or C.
- **Fine-tune DrasCLR / scratch**: the encoder plus a linear head trained end to end on
  augmented patches (``PatchAugment``, as in pretraining), starting from the DrasCLR weights or
  from a random initialisation, with the same schedule (:class:`FineTuneConfig`).

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
from drasclr.evaluation.detection_patches import DetectionPatches
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
METHODS = (PROBE_DRASCLR, PROBE_RANDOM, FINETUNE_DRASCLR, FINETUNE_SCRATCH)
#: Shuffles of the stratified group split tried before giving up (see ``subject_folds``).
FOLD_ATTEMPTS = 20


@dataclass(frozen=True)
class DetectionConfig:
    """Cross-validation and probe settings; ``device=None`` uses CUDA when present.
    ``random_init`` seeds the weights of the random-init and scratch encoders."""

    folds: int = ranged(5, Interval(2, integer=True))
    seed: int = ranged(0, COUNT)
    random_init: int = ranged(0, COUNT)
    cs: tuple[float, ...] = DEFAULT_CS
    inner_folds: int = ranged(3, Interval(2, integer=True))
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    inference_batch: int = ranged(64, AT_LEAST_ONE)
    device: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        check_numbers("cs", self.cs, POSITIVE)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device or "auto")


@dataclass(frozen=True)
class DetectionScores:
    """F1, precision and recall of the subtype over folds."""

    f1: Score
    precision: Score
    recall: Score

    @classmethod
    def of(cls, folds: Sequence[dict[str, float]]) -> "DetectionScores":
        return cls(*(Score.of([fold[name] for fold in folds])
                     for name in ("f1", "precision", "recall")))


def binary_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """F1, precision, recall of the positive class; 0 where undefined (no predicted positive)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="binary", zero_division=0)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall)}


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
                         config: DetectionConfig) -> DetectionScores:
    """Linear probe scores over subject-disjoint folds (scaler and C fitted per training part)."""
    results = []
    for train, test in folds:
        model = fit_linear_probe(h[train], y[train], groups[train], config.cs,
                                 config.inner_folds, config.seed)
        results.append(binary_scores(y[test], model.predict(h[test])))
    return DetectionScores.of(results)


def cross_validate_finetune(make_encoder: Callable[[], nn.Module], data: DetectionPatches,
                            rows: np.ndarray, y: np.ndarray, folds, config: DetectionConfig,
                            label: str = "positive") -> DetectionScores:
    """Fine-tuning scores over folds; ``make_encoder()`` gives the starting encoder each time."""
    results = []
    for train, test in folds:
        model, head = fine_tune(make_encoder(), data.patches[rows[train]], data.coords[rows[train]],
                                y[train], config.finetune, config.seed, config.torch_device, label)
        p = predict_proba(model, head, data.patches[rows[test]], data.coords[rows[test]],
                          config.inference_batch, config.torch_device)
        results.append(binary_scores(y[test], (p > 0.5).astype(np.int64)))
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
        columns = ["Method"] + [f"{s} {m}" for s in subtypes for m in ("F1", "precision", "recall")]
        rows = []
        for method, by_subtype in self.scores.items():
            row: list = [method]
            for subtype in subtypes:
                s = by_subtype.get(subtype)
                row += [s.f1, s.precision, s.recall] if s else ["", "", ""]
            rows.append(row)
        counted = "; ".join(f"{s}: {c['positive']} boxes vs {c['healthy']} healthy from "
                            f"{c['subjects']} subjects" for s, c in self.counts.items())
        table = Table("Emphysema subtype detection", columns, rows,
                      note=f"{self.config.folds}-fold cross-validation split by subject, mean ± "
                           f"SD over folds; {counted}.")
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
    make_random = lambda: random_encoder(encoder.config, config.random_init)  # noqa: E731
    features = {}  # frozen h of all patches, once per encoder, shared by the subtypes
    if PROBE_DRASCLR in methods:
        features[PROBE_DRASCLR] = encode_patches(encoder, data.patches, data.coords,
                                                 config.inference_batch, device)
    if PROBE_RANDOM in methods:
        frozen_random = calibrated_random_encoder(make_random(), data, config.inference_batch,
                                                  device)
        features[PROBE_RANDOM] = encode_patches(frozen_random, data.patches, data.coords,
                                                config.inference_batch, device)
    scores: dict[str, dict[str, DetectionScores]] = {m: {} for m in methods}
    counts = {}
    for subtype in subtypes:
        rows, y, groups = task_subset(data, subtype)
        counts[subtype] = {"positive": int(y.sum()), "healthy": int((y == 0).sum()),
                           "subjects": len(np.unique(groups))}
        folds = subject_folds(y, groups, config.folds, config.seed, f"{subtype} vs healthy")
        for method in methods:
            if method in features:
                scores[method][subtype] = cross_validate_probe(features[method][rows], y, groups,
                                                               folds, config)
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
    ``finetune`` (fine-tuned from ``encoder``, its weights saved in the head file)."""
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
                                     label=subtype, encoder=encoder.config, source=source))
        if "finetune" in kinds:
            model, head = fine_tune(encoder, data.patches[rows], data.coords[rows], y,
                                    config.finetune, config.seed, device, subtype)
            written.append(save_head(out_dir / f"head_{subtype}_finetune.pt", head.weight,
                                     head.bias, label=subtype, encoder=model.cpu(),
                                     include_encoder_weights=True,
                                     source=f"fine-tuned from {source}"))
    return written
