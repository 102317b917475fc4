"""The dense maps in the report: overlay figures and the table of scores."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from drasclr.atomic import atomic_write_bytes
from drasclr.evaluation.densemap.scoring import MapEvaluation, box_scores_of_counts


def overlay_figure(evaluation: MapEvaluation, path: str | os.PathLike) -> Path:
    """PNG of the axial slice with the most true lesion in the mapped lung (else most lung): the scan in grey,
    the true lesion outline, the probability map semi-transparent (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_axis = int(np.argmax(np.abs(evaluation.affine[2, :3])))  # the axis along world z
    reduce_axes = tuple(a for a in range(3) if a != z_axis)
    counts = (evaluation.truth & evaluation.lung).sum(axis=reduce_axes)
    if counts.max() == 0:
        counts = evaluation.lung.sum(axis=reduce_axes)
    z = int(np.argmax(counts))

    def axial(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, z, axis=z_axis).T  # rows: second in-plane axis

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(np.clip(axial(evaluation.scan), -1024, 240), cmap="gray", origin="lower")
    shown = np.ma.masked_where(axial(evaluation.lung) == 0, axial(evaluation.prob))
    image = axis.imshow(shown, cmap="magma", vmin=0, vmax=1, alpha=0.55, origin="lower")
    if axial(evaluation.truth).any():
        axis.contour(axial(evaluation.truth).astype(float), levels=[0.5], colors="cyan",
                     linewidths=0.8)
    axis.set_title(f"{evaluation.subject_id}: P({evaluation.label}), slice {z}", fontsize=9)
    axis.axis("off")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def report_sections(evaluations: Sequence[MapEvaluation], report_dir: str | os.PathLike,
                    max_figures: int = 3) -> list:
    """The dense-map part of the report: the truth table (voxel AUC and Dice against the true
    lesions, box-level detection by the paper's rule) and up to ``max_figures`` overlays,
    written under ``report_dir/densemap/``. Box scores are pooled over the subjects of each
    subtype (a healthy subject's boxes can only add false positives), voxel scores are the
    mean ± SD over subjects with lesions."""
    from drasclr.evaluation.report import Figure, Score, Section, Table

    report_dir = Path(report_dir)
    rows, figures = [], []
    by_label: dict[str, list[dict[str, float]]] = {}
    for evaluation in evaluations:
        s = evaluation.scores()
        by_label.setdefault(evaluation.label, []).append(s)
        rows.append([evaluation.subject_id, evaluation.label, s["auc"], s["dice"],
                     100 * s["prevalence"], s["box_tp"], s["box_fp"], s["box_fn"], "", "", ""])
    for label, scores in by_label.items():
        pooled = box_scores_of_counts(*(sum(s[f"box_{k}"] for s in scores)
                                        for k in ("tp", "fp", "fn")))
        with_lesions = [s for s in scores if np.isfinite(s["auc"])]
        rows.append([f"all ({len(scores)})", label,
                     Score.of([s["auc"] for s in with_lesions]),
                     Score.of([s["dice"] for s in with_lesions]), "",
                     pooled["tp"], pooled["fp"], pooled["fn"], pooled["f1"],
                     pooled["precision"], pooled["recall"]])
    for evaluation in list(evaluations)[:max_figures]:
        name = f"densemap/{evaluation.subject_id}_{evaluation.label}.png"
        overlay_figure(evaluation, report_dir / name)
        figures.append(Figure(f"{evaluation.subject_id}: {evaluation.label} probability",
                              Path(name), "Axial slice: scan (grey), true lesion outline (cyan), "
                              "probability map (colour, lung only)."))
    tables = [Table("Dense maps against the true lesions",
                    ["subject", "subtype", "voxel AUC", "Dice (p > 0.5)", "lesion % of lung",
                     "box TP", "box FP", "box FN", "box F1", "box precision", "box recall"],
                    rows,
                    "Within the lung; boxes: 32 mm, detected when >= 25% of their lung voxels "
                    "have p > 0.5 (Yu et al. 2023, Section 4.3.1), the subtype's boxes against "
                    "healthy ones; F1, precision and recall pooled over the subjects of a "
                    "subtype.")]
    intro = ("Probability of each emphysema subtype at every lung voxel, from the 32^3 patch "
             "centred on it with its own atlas coordinate (the paper's sliding window, Fig. 3), "
             "scored against the synthetic cohort's true lesion masks.")
    return [Section("Dense voxel maps", intro, tables, figures)]
