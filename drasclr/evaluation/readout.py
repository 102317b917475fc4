"""Linear readout of subject features: lung function, emphysema scores, exacerbations and
COVID-19 severity (Yu et al. 2023, Tables 2 and 4).

Each task is a scikit-learn pipeline, a StandardScaler and a linear model, scored by K-fold
cross-validation (stratified for classes, shuffled, fixed seed) as mean and SD over folds.
Everything is fitted on the training folds only: the scaler, and the regularisation strength,
which the model chooses by an inner cross-validation of the training folds (RidgeCV's
leave-one-out for regression, LogisticRegressionCV's stratified 3 folds for classes).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import make_scorer
from sklearn.model_selection import KFold, StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from drasclr.evaluation.data import COVID, Cohort, Task, density_label, task_labels
from drasclr.evaluation.report import Score, Table
from drasclr.features import FeatureSet

#: Ridge penalties and inverse logistic penalties searched in the training folds; below
#: C = 0.001 a logistic model on standardised features predicts the majority grade, beyond
#: C = 10 it only interpolates (and stops converging).
RIDGE_ALPHAS = np.logspace(-2, 6, 17)
LOGISTIC_CS = np.logspace(-3, 1, 5)
INNER_FOLDS = 3
DENSITY_ROW = "density measures"


def one_off_accuracy(y_true, y_pred) -> float:
    """Fraction of predictions within one grade of the truth (Yu et al. 2023, Table 2)."""
    return float(np.mean(np.abs(np.asarray(y_true) - np.asarray(y_pred)) <= 1))


#: Metric name -> scikit-learn scorer, per task kind.
METRICS = {
    "regression": {"R²": "r2"},
    "ordinal": {"accuracy": "accuracy", "1-off": make_scorer(one_off_accuracy)},
    "binary": {"accuracy": "accuracy", "AUC": "roc_auc"},
}


def readout_model(task: Task, seed: int = 0) -> Pipeline:
    """StandardScaler + ridge regression or multinomial logistic regression, each choosing its
    regularisation strength by cross-validation inside the data it is fitted on."""
    if task.kind == "regression":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    inner = StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=seed)
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=LOGISTIC_CS, l1_ratios=(0.0,), cv=inner, scoring="neg_log_loss", max_iter=1000,
        use_legacy_attributes=False))


@dataclass
class ReadoutScore:
    """One row's result on one task: metric -> Score over the outer folds, and the
    out-of-fold prediction of every subject of the task (for the figures)."""

    scores: dict[str, Score]
    predictions: np.ndarray


def cross_validate_readout(X: np.ndarray, y: np.ndarray, task: Task, *, folds: int = 5,
                           seed: int = 0) -> ReadoutScore:
    """Cross-validated scores of :func:`readout_model` on ``X`` -> ``y``.

    A grade absent from a training fold is simply never predicted by that fold's model; the
    held-out metrics stay valid.
    """
    splitter = (KFold if task.kind == "regression" else StratifiedKFold)(
        folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare grades (fewer members than inner folds) are expected in small cohorts.
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        result = cross_validate(readout_model(task, seed), X, y, cv=splitter,
                                scoring=METRICS[task.kind], return_estimator=True,
                                return_indices=True, error_score="raise")
    predictions = np.empty(len(y), dtype=np.float64 if task.kind == "regression" else np.int64)
    for estimator, test in zip(result["estimator"], result["indices"]["test"]):
        predictions[test] = estimator.predict(X[test])
    return ReadoutScore({name: Score.of(result[f"test_{name}"]) for name in METRICS[task.kind]},
                        predictions)


def readout_rows(cohort: Cohort) -> dict[str, np.ndarray]:
    """The tables' rows: every feature set, the density measures, and density + each set."""
    rows = dict(cohort.features)
    rows[DENSITY_ROW] = cohort.density
    rows.update({f"density + {name}": np.hstack([cohort.density, features])
                 for name, features in cohort.features.items()})
    return rows


def readout(cohort: Cohort, *, folds: int = 5, seed: int = 0) -> dict[str, dict[str, ReadoutScore]]:
    """Row name -> task key -> :class:`ReadoutScore`, for every readout task of the cohort."""
    return {name: {key: cross_validate_readout(X[labels.index], labels.y, labels.task,
                                               folds=folds, seed=seed)
                   for key, labels in cohort.labels.items()}
            for name, X in readout_rows(cohort).items()}


def readout_scores(features: FeatureSet, clinical: pd.DataFrame, tasks: Sequence[str], *,
                   folds: int = 5, seed: int = 0) -> dict[str, Score]:
    """Task key -> the task's first metric (R² or accuracy) for one feature set, the measure
    of the ablation tables (Yu et al. 2023, Tables 6 and 8); ``clinical`` from
    ``drasclr.evaluation.data.load_clinical``."""
    labels = task_labels(clinical, features.subject_ids, tasks, folds=folds,
                         source=f"feature set '{features.name}'")
    X = np.asarray(features.features, dtype=np.float64)
    return {key: next(iter(cross_validate_readout(X[lab.index], lab.y, lab.task, folds=folds,
                                                  seed=seed).scores.values()))
            for key, lab in labels.items()}


def readout_table(results: dict[str, dict[str, ReadoutScore]], cohort: Cohort,
                  folds: int) -> Table:
    """The paper's layout: one row per representation, one column per task metric."""
    tasks = [labels.task for labels in cohort.labels.values()]
    columns = ["Representation"] + [f"{t.title} {metric}"
                                    for t in tasks for metric in METRICS[t.kind]]
    rows = [[name] + [by_task[t.key].scores[metric] for t in tasks for metric in METRICS[t.kind]]
            for name, by_task in results.items()]
    subjects = "; ".join(f"{lab.task.title}: {len(lab.y)}" for lab in cohort.labels.values())
    notes = " ".join(lab.note for lab in cohort.labels.values() if lab.note)
    density = ", ".join(density_label(c) for c in cohort.density_columns)
    title = ("COVID-19 severity, 5 grades" if cohort.kind == COVID
             else "Lung function, emphysema scores and exacerbations")
    note = (f"{folds}-fold cross-validation (stratified for classes, seeded), mean ± SD over "
            f"folds. R²: ridge regression; accuracy, 1-off accuracy (within one grade) and AUC: "
            f"multinomial logistic regression. Standardisation and regularisation strength are "
            f"fitted inside the training folds (leave-one-out for ridge, {INNER_FOLDS}-fold for "
            f"logistic regression). Density measures: {density}. Subjects per task: {subjects}. "
            f"{notes}").strip()
    return Table(title, columns, rows, note)
