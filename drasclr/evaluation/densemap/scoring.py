"""Scoring dense maps: the paper's box rule, and agreement with the true lesions.

:func:`box_detections` applies the paper's detection rule (Yu et al. 2023, Section 4.3.1: a
32 mm box is detected when at least 25 % of its voxels have probability above 0.5), the
fraction taken over the box's lung voxels, and :func:`box_scores` gives box-level F1, precision
and recall; :func:`truth_scores` compares a map with the true lesion mask of the synthetic
cohort (voxel AUC, Dice at 0.5 within the lung), which the paper could not.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from drasclr.data.io import read_ct
from drasclr.evaluation.densemap.maps import DenseMapResult

#: The paper's detection rule (Section 4.3.1): box detected when >= 25 % of voxels are > 0.5.
DETECTION_THRESHOLD = 0.5
DETECTION_FRACTION = 0.25
#: Lesion labels of the synthetic COPD cohort (``drasclr.data.synthetic``).
LESION_LABELS = {"centrilobular": 1, "paraseptal": 2, "panlobular": 3}


def box_voxels(shape: Sequence[int], affine: np.ndarray, centre_mm: np.ndarray,
               box_mm: float = 32.0) -> np.ndarray:
    """(N, 3) indices of the grid's voxels whose centres lie in the world-axis-aligned cube of
    edge ``box_mm`` centred at ``centre_mm`` (half-open: [c - e/2, c + e/2))."""
    half = box_mm / 2.0
    centre = np.asarray(centre_mm, dtype=np.float64)
    corners = centre + half * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij")
                                       ).reshape(3, -1).T
    to_voxel = np.linalg.inv(affine)
    idx = corners @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    low = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, np.asarray(shape))
    if (high <= low).any():
        return np.zeros((0, 3), dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"),
                    axis=-1).reshape(-1, 3)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all((world >= centre - half - 1e-6) & (world < centre + half - 1e-6), axis=1)
    return grid[inside]


def lung_fraction_above(prob: np.ndarray, lung: np.ndarray,
                        threshold: float = DETECTION_THRESHOLD) -> float:
    """Share of a box's LUNG voxels whose probability is above ``threshold`` (the paper's box
    fraction; voxels outside the lung are left out rather than counted as 0, which would cap a
    subpleural box near one half). NaN for a box without lung voxels."""
    lung = np.asarray(lung, dtype=bool)
    return float(np.mean(np.asarray(prob)[lung] > threshold)) if lung.any() else float("nan")


def detected_by_fraction(fractions: np.ndarray,
                         min_fraction: float = DETECTION_FRACTION) -> np.ndarray:
    """The paper's rule on box fractions: detected when >= ``min_fraction``; NaN: not detected."""
    return np.nan_to_num(np.asarray(fractions, dtype=np.float64), nan=0.0) >= min_fraction


def box_detections(prob: np.ndarray, lung: np.ndarray, affine: np.ndarray,
                   centres_mm: np.ndarray, box_mm: float = 32.0,
                   threshold: float = DETECTION_THRESHOLD,
                   min_fraction: float = DETECTION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The paper's detection rule (Yu et al. 2023, Section 4.3.1) on a map: a box is detected
    when at least ``min_fraction`` of its lung voxels (``lung``, bool on the map's grid) have
    probability above ``threshold``.

    Returns:
        (detected (N,) bool, fraction (N,) of the box's lung voxels above the threshold; NaN for
        a box with no lung voxel in the map, never detected).
    """
    centres_mm = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    fractions = np.full(len(centres_mm), np.nan)
    for i, centre in enumerate(centres_mm):
        idx = tuple(box_voxels(prob.shape, affine, centre, box_mm).T)
        if len(idx[0]):
            fractions[i] = lung_fraction_above(prob[idx], lung[idx], threshold)
    return detected_by_fraction(fractions, min_fraction), fractions


def box_scores(detected: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """Box-level precision, recall and F1 (0 where undefined) with the counts."""
    detected, positive = np.asarray(detected, bool), np.asarray(positive, bool)
    return box_scores_of_counts(int(np.sum(detected & positive)), int(np.sum(detected & ~positive)),
                                int(np.sum(~detected & positive)))


def box_scores_of_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 (0 where undefined) of true/false positive and false negative
    counts, with the counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def subject_boxes(annotations: str | os.PathLike, subject_id: str, label: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Box centres (N, 3) world mm of one subject from an annotation CSV (``subject_id, label,
    x_mm, y_mm, z_mm``, as the synthetic cohort's ``annotations.csv``) and whether each is a
    ``label`` box; only ``label`` and ``healthy`` boxes, as the paper's subtype-vs-healthy task."""
    import csv

    path = Path(annotations)
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        mine = [r for r in rows if r["subject_id"] == subject_id and r["label"] in (label, "healthy")]
        centres = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in mine])
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not an annotation CSV with subject_id, label, x_mm, y_mm, "
                         f"z_mm ({error!r})") from None
    return centres.reshape(-1, 3), np.array([r["label"] == label for r in mine], dtype=bool)


def truth_scores(prob: np.ndarray, truth: np.ndarray, lung: np.ndarray,
                 threshold: float = DETECTION_THRESHOLD) -> dict[str, float]:
    """Voxel-level agreement of a map with the true lesion mask, within the lung.

    Returns ``auc`` (``sklearn.metrics.roc_auc_score``; NaN when the lung holds only one
    class), ``dice`` of ``prob > threshold`` with the truth (1 when both are empty), the
    lesion ``prevalence`` and ``voxels`` in the lung.
    """
    from sklearn.metrics import roc_auc_score

    if not (prob.shape == truth.shape == lung.shape):
        raise ValueError(f"map {prob.shape}, truth {truth.shape} and lung {lung.shape} must "
                         "share one grid")
    lung = np.asarray(lung, bool)
    p, t = np.asarray(prob)[lung].astype(np.float64), np.asarray(truth)[lung].astype(bool)
    auc = float(roc_auc_score(t, p)) if 0 < t.sum() < t.size else float("nan")
    predicted = p > threshold
    denominator = predicted.sum() + t.sum()
    dice = float(2 * np.sum(predicted & t) / denominator) if denominator else 1.0
    return {"auc": auc, "dice": dice, "prevalence": float(t.mean()) if t.size else float("nan"),
            "voxels": int(t.size)}


@dataclass
class MapEvaluation:
    """One subject's map scored against its truth, everything on the scan's own grid.

    Attributes:
        subject_id, label: whose map, of which subtype.
        scan: (X, Y, Z) HU; prob: the map; truth: true lesion mask of that subtype (bool);
        lung: bool lung mask; affine: the grid's affine.
        boxes_mm: (N, 3) annotated box centres; box_positive: (N,) bool, box of the subtype.
    """

    subject_id: str
    label: str
    scan: np.ndarray
    prob: np.ndarray
    truth: np.ndarray
    lung: np.ndarray
    affine: np.ndarray
    boxes_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    box_positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def scores(self) -> dict[str, float]:
        scores = truth_scores(self.prob, self.truth, self.lung)
        detected, _ = box_detections(self.prob, self.lung, self.affine, self.boxes_mm)
        boxes = box_scores(detected, self.box_positive)
        scores.update({f"box_{k}": v for k, v in boxes.items()})
        return scores


def evaluate_map(result: DenseMapResult, lesions: str | os.PathLike,
                 annotations: Optional[str | os.PathLike] = None,
                 lesion_label: Optional[int] = None) -> MapEvaluation:
    """Score a :func:`densemap` result against a true lesion label file on the scan's grid
    (the synthetic cohort's ``lesions/<id>.nii.gz``), within the mapped lung voxels, and
    against the subject's boxes in ``annotations`` when given (refused when the head was
    trained on them, :func:`check_not_trained_on`).

    ``lesion_label`` is the subtype's value in ``lesions`` (default :func:`lesion_value` of the
    map's label). Everything is put on the scan's own grid, as the map file is.
    """
    value = lesion_value(result.label) if lesion_label is None else lesion_label
    original = result.scan.original
    truth = read_ct(lesions)
    if truth.array.shape != original.array.shape or not np.allclose(truth.affine, original.affine,
                                                                    atol=1e-3):
        raise ValueError(f"{lesions}: lesion grid {truth.array.shape} differs from the scan's "
                         f"{original.array.shape} ({original.source})")
    centres, positive = np.zeros((0, 3)), np.zeros(0, bool)
    if annotations is not None:
        check_not_trained_on(result.training_subjects, result.subject_id, result.head_path)
        centres, positive = subject_boxes(annotations, result.subject_id, result.label)
    return MapEvaluation(result.subject_id, result.label, original.array,
                         result.on_scan_grid(result.map_iso), np.rint(truth.array) == value,
                         result.on_scan_grid(result.mapped) >= 0.5, original.affine, centres,
                         positive)


def box_evaluation(result: DenseMapResult, annotations: str | os.PathLike) -> dict[str, float]:
    """Box-level precision, recall and F1 of a map on its subject's boxes of ``annotations``
    by the paper's rule, with the counts; refused when the head was trained on them."""
    check_not_trained_on(result.training_subjects, result.subject_id, result.head_path)
    centres, positive = subject_boxes(annotations, result.subject_id, result.label)
    detected, _ = box_detections(result.map_iso, result.mapped, result.scan.iso.affine, centres)
    return {**box_scores(detected, positive), "boxes": len(positive),
            "positive": int(positive.sum())}


def check_not_trained_on(training_subjects: Optional[Sequence[str]], subject_id: str,
                         head_path: str | os.PathLike | None, warn: bool = True) -> None:
    """A map may be scored on its subject's boxes only when its head never saw them.

    Raises:
        ValueError: ``subject_id`` is among the head's ``training_subjects``.
    Warns:
        UserWarning (when ``warn``): the head file records no training subjects (None; written
            before heads did), so the boxes may have trained it.
    """
    if training_subjects is None:
        if warn:
            warnings.warn(f"{head_path}: the head file does not record the subjects it was "
                          f"trained on, so the boxes of {subject_id} may have trained it; "
                          "refit the head (`drasclr detect`) for a held-out score", stacklevel=3)
    elif subject_id in training_subjects:
        raise ValueError(f"{head_path}: the head was trained on the boxes of subject "
                         f"{subject_id}; its box scores on them would not be held out (map a "
                         "subject the head was not trained on, or refit the head without it)")


def lesion_value(label: str) -> int:
    """The synthetic cohort's lesion label of a subtype name."""
    if label not in LESION_LABELS:
        raise ValueError(f"label {label!r}: no lesion value known; expected one of "
                         f"{sorted(LESION_LABELS)}")
    return LESION_LABELS[label]

