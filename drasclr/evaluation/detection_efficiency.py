"""Label efficiency of fine-tuning (Yu et al. 2023, Section 4.3.2, Fig. 5).

Fine-tune from the DrasCLR weights on 10 %, 20 %, ... 100 % of the labelled training boxes of
each subject-disjoint fold, and from scratch on all of them; report F1 against the fraction
and the smallest fraction from which on DrasCLR matches scratch-with-everything. The subsets are
drawn inside each training part (never touching the test subjects), per class so that both
classes stay present, and nested: the 20 % subset contains the 10 % one, so the curve shows
the effect of more labels rather than of a different draw.

Every run takes the same number of optimisation steps (``FineTuneConfig.steps``; by default
what ``epochs`` passes over the largest training part take), so 10 % of the labels means
fewer distinct boxes, not also ten times fewer updates. Test boxes are scored by the
detection rule of the config (the paper's voxel rule by default). ``repeats`` redraws the
folds; the spread (SD, and every value in the table) is over folds x repeats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from drasclr.evaluation.detection import (
    DetectionConfig, DetectionScores, all_lesion_f1, score_fine_tuned, subject_folds, task_subset,
)
from drasclr.evaluation.detection_patches import DetectionPatches
from drasclr.evaluation.report import Figure, Section, Table
from drasclr.features import random_encoder
from drasclr.ranges import AT_LEAST_ONE, check_number

DEFAULT_FRACTIONS = tuple(round(0.1 * k, 1) for k in range(1, 11))
#: Seed offset between repeats (larger than the fold-split attempts of ``subject_folds``).
REPEAT_SEEDS = 1000


@dataclass
class LabelEfficiency:
    """F1/precision/recall per fraction (DrasCLR) and with all labels from scratch."""

    subtype: str
    fractions: tuple[float, ...]
    drasclr: list[DetectionScores]
    scratch: DetectionScores
    folds: int
    steps: int = 0  # optimisation steps of every fine-tuning run
    repeats: int = 1
    all_lesion_f1: float | None = None  # F1 of calling every box a lesion, the floor

    @property
    def matching_fraction(self) -> float | None:
        """Smallest fraction from which on every mean F1 reaches scratch-with-everything's;
        None if none. A fraction that reaches it while a larger one falls below again does not
        count: "matches from 20 %" must hold at 50 % and 100 % too."""
        match = None
        for fraction, scores in reversed(list(zip(self.fractions, self.drasclr))):
            if scores.f1.mean < self.scratch.f1.mean:
                break
            match = fraction
        return match

    def plot(self, path: str | Path) -> Path:
        """PNG of F1 (mean ± SD over folds) against the fraction, scratch as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from drasclr.atomic import atomic_path

        means = np.array([s.f1.mean for s in self.drasclr])
        sds = np.array([s.f1.sd for s in self.drasclr])
        figure, axes = plt.subplots(figsize=(5, 3.5))
        percent = 100 * np.asarray(self.fractions)
        axes.errorbar(percent, means, yerr=sds, marker="o", capsize=3, label="Fine-tune DrasCLR")
        axes.axhline(self.scratch.f1.mean, color="grey", linestyle="--",
                     label="Fine-tune scratch, 100 %")
        if self.all_lesion_f1 is not None:
            axes.axhline(self.all_lesion_f1, color="grey", linestyle=":",
                         label="every box called a lesion")
        axes.set_xlabel("labelled training boxes (%)")
        axes.set_ylabel("F1")
        axes.set_title(f"{self.subtype} vs healthy")
        axes.set_ylim(0, 1.02)
        axes.legend(loc="lower right")
        figure.tight_layout()
        path = Path(path)
        with atomic_path(path, ".png") as temporary:
            figure.savefig(temporary, dpi=120)
        plt.close(figure)
        return path

    def section(self, figure_path: str | Path | None = None) -> Section:
        rows = [[f"{100 * f:g} %", s.f1, s.precision, s.recall]
                for f, s in zip(self.fractions, self.drasclr)]
        rows.append(["scratch, 100 %", self.scratch.f1, self.scratch.precision,
                     self.scratch.recall])
        match = self.matching_fraction
        found = (f"DrasCLR matches scratch-with-everything from {100 * match:g} % of the labels."
                 if match is not None else
                 f"DrasCLR does not match scratch-with-everything from any fraction tried on "
                 f"(mean F1 {self.drasclr[-1].f1.mean:.2f} with {100 * self.fractions[-1]:g} % "
                 f"against {self.scratch.f1.mean:.2f}).")
        floor = ("" if self.all_lesion_f1 is None else
                 f" Calling every box a lesion scores F1 {self.all_lesion_f1:.2f}.")
        table = Table(f"Label efficiency, {self.subtype} vs healthy",
                      ["Training boxes", "F1", "precision", "recall"], rows,
                      note=f"Fine-tuned from DrasCLR on a fraction of each training fold, "
                           f"{self.steps} optimisation steps at every fraction; "
                           f"{self.folds} subject-disjoint folds x {self.repeats} repeat(s), "
                           f"mean ± SD. {found}{floor}")
        figures = ([Figure(f"Label efficiency, {self.subtype}", Path(figure_path), found)]
                   if figure_path is not None else [])
        return Section(f"Label efficiency ({self.subtype})",
                       "F1 of fine-tuning against the fraction of labelled boxes "
                       "(Yu et al. 2023).", [table], figures)


def nested_subsets(y: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Per fraction, sorted indices of a class-stratified subset of ``y``: ceil(f * n_class)
    of each class (so at least one), prefixes of one seeded permutation per class (nested)."""
    rng = np.random.default_rng(seed)
    orders = {label: rng.permutation(np.flatnonzero(y == label)) for label in np.unique(y)}
    return [np.sort(np.concatenate([order[:int(np.ceil(f * len(order) - 1e-9))]
                                    for order in orders.values()])) for f in fractions]


def label_efficiency(data: DetectionPatches, encoder: nn.Module, subtype: str,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     config: DetectionConfig = DetectionConfig(),
                     repeats: int = 1) -> LabelEfficiency:
    """Fine-tune ``encoder`` on each fraction of every training fold, and a random-init
    encoder of the same architecture on all of it, each for the same number of optimisation
    steps; score on the fold's test subjects. ``repeats`` draws of the folds."""
    fractions = tuple(float(f) for f in fractions)
    if (not fractions or any(not 0 < f <= 1 for f in fractions)
            or list(fractions) != sorted(fractions)):
        raise ValueError(f"fractions: expected increasing values in (0, 1], got {fractions}")
    check_number("repeats", repeats, AT_LEAST_ONE)
    rows, y, groups = task_subset(data, subtype)
    draws = [subject_folds(y, groups, config.folds, config.seed + REPEAT_SEEDS * r,
                           f"{subtype} vs healthy") for r in range(repeats)]
    steps = config.finetune.steps or config.finetune.epochs * max(
        math.ceil(len(train) / config.finetune.batch_size) for folds in draws for train, _ in folds)
    fixed = replace(config, finetune=replace(config.finetune, steps=steps))

    per_fraction: list[list[dict[str, float]]] = [[] for _ in fractions]
    scratch = []
    for r, folds in enumerate(draws):
        for number, (train, test) in enumerate(folds):
            seed = config.seed + REPEAT_SEEDS * r + number
            for k, subset in enumerate(nested_subsets(y[train], fractions, seed)):
                per_fraction[k].append(score_fine_tuned(encoder, data, rows, y, train[subset],
                                                        test, fixed, subtype))
            scratch.append(score_fine_tuned(random_encoder(encoder.config, config.random_init),
                                            data, rows, y, train, test, fixed, subtype))
    return LabelEfficiency(subtype, fractions, [DetectionScores.of(r) for r in per_fraction],
                           DetectionScores.of(scratch), config.folds, steps, repeats,
                           all_lesion_f1(int(y.sum()), int((y == 0).sum())))
