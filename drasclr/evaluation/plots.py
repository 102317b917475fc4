"""Figures of the subject-level evaluation, drawn with matplotlib's object API on the Agg
canvas (no display, no global pyplot state) and written as PNG by ``report.save_figure``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from lifelines import KaplanMeierFitter
from matplotlib.figure import Figure as MatplotlibFigure
from sklearn.metrics import ConfusionMatrixDisplay, r2_score

from drasclr.evaluation.report import Score, save_figure

TERTILES = ("low risk", "middle risk", "high risk")


def _grid(panels: int, columns: int, width: float, height: float, **options):
    rows = -(-panels // columns)
    columns = min(columns, panels)
    figure = MatplotlibFigure(figsize=(width * columns, height * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False, **options)).ravel()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def score_bars(scores: dict[str, dict[str, Score]], title: str, path: str | Path) -> Path:
    """One panel per metric (``scores``: metric -> row name -> Score): a bar per row at the
    mean, the SD as error bar and the fold values as dots."""
    metrics = list(scores)
    names = list(next(iter(scores.values())))
    figure, axes = _grid(len(metrics), 4, 3.2, 0.45 * len(names) + 1.0, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(names))]
    positions = np.arange(len(names))
    for axis, metric in zip(axes, metrics):
        means = [scores[metric][n].mean for n in names]
        sds = [scores[metric][n].sd for n in names]
        axis.barh(positions, means, xerr=sds, color=colours, alpha=0.55, capsize=3)
        for position, name in zip(positions, names):
            values = scores[metric][name].values
            jitter = np.linspace(-0.2, 0.2, len(values)) if len(values) > 1 else [0.0]
            axis.plot(values, position + np.asarray(jitter), "k.", markersize=3)
        axis.set_title(metric, fontsize=10)
        axis.axvline(0, color="grey", linewidth=0.8)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    figure.suptitle(title)
    return save_figure(figure, path)


def predicted_vs_true(truth: np.ndarray, predictions: dict[str, np.ndarray], label: str,
                      path: str | Path) -> Path:
    """Out-of-fold prediction against truth, one panel per row, with the identity line."""
    figure, axes = _grid(len(predictions), 3, 3.4, 3.4)
    low, high = truth.min(), truth.max()
    for axis, (name, predicted) in zip(axes, predictions.items()):
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axis.scatter(truth, predicted, s=12, alpha=0.7)
        axis.set_title(f"{name}\npooled out-of-fold R² {r2_score(truth, predicted):.2f}",
                       fontsize=9)
        axis.set_xlabel(f"true {label}")
        axis.set_ylabel(f"predicted {label}")
    return save_figure(figure, path)


def confusion_matrices(truth: np.ndarray, predictions: dict[str, np.ndarray],
                       grades: tuple[int, ...], title: str, path: str | Path) -> Path:
    """Out-of-fold confusion matrix (counts), one panel per row."""
    figure, axes = _grid(len(predictions), 3, 3.3, 3.3)
    for axis, (name, predicted) in zip(axes, predictions.items()):
        ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=list(grades), ax=axis,
                                                colorbar=False, cmap="Blues")
        axis.set_title(name, fontsize=9)
    figure.suptitle(title)
    return save_figure(figure, path)


def kaplan_meier(time: np.ndarray, event: np.ndarray, groups: dict[str, np.ndarray],
                 path: str | Path) -> Path:
    """Kaplan-Meier curves of the held-out subjects in each tertile of predicted risk."""
    figure, axes = _grid(len(groups), 3, 3.6, 3.0, sharey=True)
    for axis, (name, group) in zip(axes, groups.items()):
        for tertile, label in enumerate(TERTILES):
            members = group == tertile
            if members.any():
                KaplanMeierFitter().fit(time[members], event[members],
                                        label=f"{label} ({members.sum()})"
                                        ).plot_survival_function(ax=axis, ci_show=False)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("follow-up time")
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("survival")
    return save_figure(figure, path)
