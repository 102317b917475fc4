"""Linear readout of subject features: lung function, emphysema scores, exacerbations and
COVID-19 severity (Yu et al. 2023, Tables 2 and 4), and the scanner (site, kernel) as a control.

Each task is a scikit-learn pipeline, a StandardScaler and a linear model, scored by repeated
K-fold cross-validation (stratified for classes, seeded). The splits of a task are drawn once
(:func:`readout_splits`) and every row is scored on the same ones, so rows can be compared by
a paired test on the splits (``drasclr.evaluation.paired``). A method with several pretraining
seeds is scored on each seed's features: its score holds every (seed, split) value, and its
per-split values for the paired tests are the means over its seeds.
Everything is fitted on the training folds only: the scaler, and the regularisation strength,
which the model chooses by an inner cross-validation of the training folds: 3 shuffled,
seeded folds (stratified for classes), scored by squared error or log-loss. Not RidgeCV's
leave-one-out: with more features than training subjects (128 against 48) it now and then
chose the grid's smallest penalty, a near-interpolating fit whose held-out R² fell to -3 to -7
and dominated the spread of a row (benchmarks/RESULTS.md, full run at cohort seed 0).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import make_scorer
from sklearn.model_selection import (
    KFold, RepeatedKFold, RepeatedStratifiedKFold, StratifiedKFold, cross_validate,
)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from drasclr.evaluation.data import COVID, Cohort, Labels, Task, density_label, task_labels
from drasclr.evaluation.paired import TEST_NAME, paired_difference
from drasclr.evaluation.report import Score, Table
from drasclr.features import FeatureSet

#: Ridge penalties and inverse logistic penalties searched in the training folds; below
#: C = 0.001 a logistic model on standardised features predicts the majority grade, beyond
#: C = 10 it only interpolates (and stops converging).
RIDGE_ALPHAS = np.logspace(-2, 6, 17)
LOGISTIC_CS = np.logspace(-3, 1, 5)
INNER_FOLDS = 3
DENSITY_ROW = "density measures"
REGIONAL_ROW = "regional LAA-950"
TRUTH_ROW = "true lesion shares (ceiling)"

Split = tuple[np.ndarray, np.ndarray]


def one_off_accuracy(y_true, y_pred) -> float:
    """Fraction of predictions within one grade of the truth (Yu et al. 2023, Table 2)."""
    return float(np.mean(np.abs(np.asarray(y_true) - np.asarray(y_pred)) <= 1))


#: Metric name -> scikit-learn scorer, per task kind; the first is the task's main metric.
METRICS = {
    "regression": {"R²": "r2"},
    "ordinal": {"accuracy": "accuracy", "1-off": make_scorer(one_off_accuracy)},
    "nominal": {"accuracy": "accuracy"},
    "binary": {"accuracy": "accuracy", "AUC": "roc_auc"},
}


def main_metric(task: Task) -> str:
    """The metric of a task that the comparisons and the reading use (R² or accuracy)."""
    return next(iter(METRICS[task.kind]))


def readout_model(task: Task, seed: int = 0) -> Pipeline:
    """StandardScaler + ridge regression or multinomial logistic regression, each choosing its
    regularisation strength by an inner ``INNER_FOLDS``-fold cross-validation (seeded) of the
    data it is fitted on."""
    if task.kind == "regression":
        inner = KFold(INNER_FOLDS, shuffle=True, random_state=seed)
        return make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS, cv=inner,
                                                       scoring="neg_mean_squared_error"))
    inner = StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=seed)
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=LOGISTIC_CS, l1_ratios=(0.0,), cv=inner, scoring="neg_log_loss", max_iter=1000,
        use_legacy_attributes=False))


def readout_splits(y: np.ndarray, task: Task, *, folds: int = 5, repeats: int = 1,
                   seed: int = 0) -> list[Split]:
    """``repeats`` x ``folds`` (train, test) index pairs, stratified by ``y`` for classes; the
    same for every row of a table."""
    splitter = (RepeatedKFold if task.kind == "regression" else RepeatedStratifiedKFold)(
        n_splits=folds, n_repeats=repeats, random_state=seed)
    with _rare_grades_expected():
        return list(splitter.split(np.zeros((len(y), 1)), y))


@contextmanager
def _rare_grades_expected():
    """Rare grades (fewer members than folds) are expected in small cohorts: no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        yield


@dataclass
class ReadoutScore:
    """One row's result on one task.

    Attributes:
        scores: metric -> Score over every (seed, split).
        per_split: metric -> (splits,) values averaged over the seeds: the paired tests' input.
        predictions: out-of-fold prediction of every subject of the task by the first seed's
            first repeat (for the figures).
    """

    scores: dict[str, Score]
    per_split: dict[str, np.ndarray]
    predictions: np.ndarray


def cross_validate_readout(X: np.ndarray | Sequence[np.ndarray], y: np.ndarray, task: Task, *,
                           folds: int = 5, repeats: int = 1, seed: int = 0,
                           splits: list[Split] | None = None, n_jobs: int = 1) -> ReadoutScore:
    """Cross-validated scores of :func:`readout_model` on ``X`` -> ``y``; ``X`` is one matrix
    or one per pretraining seed, ``splits`` by default :func:`readout_splits`; ``n_jobs``
    splits fitted at once (scikit-learn's).

    A grade absent from a training fold is simply never predicted by that fold's model; the
    held-out metrics stay valid.
    """
    matrices = [X] if isinstance(X, np.ndarray) else list(X)
    splits = readout_splits(y, task, folds=folds, repeats=repeats, seed=seed) \
        if splits is None else splits
    values = {name: [] for name in METRICS[task.kind]}
    predictions = np.empty(len(y), dtype=np.float64 if task.kind == "regression" else np.int64)
    for i, matrix in enumerate(matrices):
        with _rare_grades_expected():
            result = cross_validate(readout_model(task, seed), matrix, y, cv=splits,
                                    scoring=METRICS[task.kind], return_estimator=i == 0,
                                    error_score="raise", n_jobs=n_jobs)
        for name in values:
            values[name].append(result[f"test_{name}"])
        if i == 0:
            first_repeat = len(splits) // repeats if splits else 0
            for estimator, (_, test) in zip(result["estimator"][:first_repeat], splits):
                predictions[test] = estimator.predict(matrix[test])
    return ReadoutScore({name: Score.of(v) for name, v in values.items()},
                        {name: np.mean(v, axis=0) for name, v in values.items()}, predictions)


def readout_rows(cohort: Cohort) -> dict[str, list[np.ndarray]]:
    """The tables' rows, each a list of matrices (one per seed): every method, the density
    measures, the regional LAA-950, the true lesion shares (ceiling), density + each method."""
    rows = dict(cohort.features)
    rows[DENSITY_ROW] = [cohort.density]
    if cohort.regional is not None:
        rows[REGIONAL_ROW] = [cohort.regional]
    if cohort.truth is not None:
        rows[TRUTH_ROW] = [cohort.truth]
    rows.update({f"density + {name}": [np.hstack([cohort.density, f]) for f in seeds]
                 for name, seeds in cohort.features.items()})
    return rows


def score_rows(rows: dict[str, list[np.ndarray]], labels: dict[str, Labels], *, folds: int,
               repeats: int, seed: int, n_jobs: int = 1) -> dict[str, dict[str, ReadoutScore]]:
    """Row name -> task key -> :class:`ReadoutScore`, every row on the same splits."""
    splits = {key: readout_splits(lab.y, lab.task, folds=folds, repeats=repeats, seed=seed)
              for key, lab in labels.items()}
    return {name: {key: cross_validate_readout([m[lab.index] for m in matrices], lab.y,
                                               lab.task, folds=folds, repeats=repeats,
                                               seed=seed, splits=splits[key], n_jobs=n_jobs)
                   for key, lab in labels.items()}
            for name, matrices in rows.items()}


def readout(cohort: Cohort, *, folds: int = 5, repeats: int = 1, seed: int = 0,
            n_jobs: int = 1) -> dict[str, dict[str, ReadoutScore]]:
    """Row name -> task key -> :class:`ReadoutScore`, for every readout task of the cohort."""
    return score_rows(readout_rows(cohort), cohort.labels, folds=folds, repeats=repeats,
                      seed=seed, n_jobs=n_jobs)


def scanner_rows(cohort: Cohort) -> dict[str, list[np.ndarray]]:
    """The rows of the scanner readout: every method, the density measures, regional LAA-950
    and the true lesion shares."""
    rows = readout_rows(cohort)
    return {name: rows[name] for name in (*cohort.features, DENSITY_ROW, REGIONAL_ROW, TRUTH_ROW)
            if name in rows}


def chance_accuracy(labels: Labels, splits: list[Split]) -> np.ndarray:
    """Per split, the held-out accuracy of always predicting the training folds' majority."""
    out = []
    for train, test in splits:
        values, counts = np.unique(labels.y[train], return_counts=True)
        out.append(np.mean(labels.y[test] == values[np.argmax(counts)]))
    return np.array(out)


def scanner_table(cohort: Cohort, *, folds: int, repeats: int, seed: int,
                  n_jobs: int = 1) -> Table:
    """How well each representation predicts the scanner (site, kernel), against chance on the
    same splits: a representation of the lungs should be near chance."""
    results = score_rows(scanner_rows(cohort), cohort.scanner, folds=folds, repeats=repeats,
                         seed=seed, n_jobs=n_jobs)
    chance = {key: chance_accuracy(lab, readout_splits(lab.y, lab.task, folds=folds,
                                                       repeats=repeats, seed=seed))
              for key, lab in cohort.scanner.items()}
    columns = ["Representation"]
    for key, lab in cohort.scanner.items():
        columns += [f"{lab.task.title} accuracy", f"{lab.task.title} accuracy − chance"]
    rows = [[name] + [cell for key in cohort.scanner for cell in (
        by_task[key].scores["accuracy"],
        paired_difference(by_task[key].per_split["accuracy"], chance[key], folds))]
        for name, by_task in results.items()]
    chances = "; ".join(f"{lab.task.title} {np.mean(chance[key]):.2f} "
                        f"({len(lab.task.grades)} classes)" for key, lab in cohort.scanner.items())
    note = (f"Linear readout of the scanner from each representation, {_protocol(folds, repeats)}"
            f" Chance: the held-out accuracy of predicting the training folds' most frequent "
            f"class, on the same splits ({chances}); − chance: mean difference and p of the "
            f"{TEST_NAME}. A representation of the lungs, not of the scanner, stays near chance.")
    title = " and ".join(lab.task.title.lower() for lab in cohort.scanner.values())
    return Table(f"Scanner readout: {title}", columns, rows, note)


def _protocol(folds: int, repeats: int) -> str:
    return (f"{repeats} × {folds}-fold cross-validation (stratified for classes, seeded; the "
            f"same splits for every row); mean ± SD over every (seed, split) of the row.")


def readout_scores(features: FeatureSet, clinical: pd.DataFrame, tasks: Sequence[str], *,
                   folds: int = 5, seed: int = 0) -> dict[str, Score]:
    """Task key -> the task's first metric (R² or accuracy) for one feature set, the measure
    of the ablation tables (Yu et al. 2023, Tables 6 and 8); ``clinical`` from
    ``drasclr.evaluation.data.load_clinical``."""
    labels = task_labels(clinical, features.subject_ids, tasks, folds=folds,
                         source=f"feature set '{features.name}'")
    X = np.asarray(features.features, dtype=np.float64)
    return {key: cross_validate_readout(X[lab.index], lab.y, lab.task, folds=folds,
                                        seed=seed).scores[main_metric(lab.task)]
            for key, lab in labels.items()}


def readout_table(results: dict[str, dict[str, ReadoutScore]], cohort: Cohort, folds: int,
                  repeats: int = 1) -> Table:
    """The paper's layout: one row per representation, one column per task metric."""
    tasks = [labels.task for labels in cohort.labels.values()]
    columns = ["Representation", "Seeds"] + [f"{t.title} {metric}"
                                             for t in tasks for metric in METRICS[t.kind]]
    rows = [[name, _seeds(cohort, name)]
            + [by_task[t.key].scores[metric] for t in tasks for metric in METRICS[t.kind]]
            for name, by_task in results.items()]
    subjects = "; ".join(f"{lab.task.title}: {len(lab.y)}" for lab in cohort.labels.values())
    notes = " ".join(lab.note for lab in cohort.labels.values() if lab.note)
    density = ", ".join(density_label(c) for c in cohort.density_columns)
    title = ("COVID-19 severity, 5 grades" if cohort.kind == COVID
             else "Lung function, emphysema scores and exacerbations")
    ceiling = (f" {TRUTH_ROW}: the clinical table's {', '.join(cohort.truth_columns)}, what the "
               f"images were generated from (a ceiling, not a method)."
               if cohort.truth is not None else "")
    regional = (f" {REGIONAL_ROW}: by thirds of the lung height and in the rind (10 mm under "
                f"the pleura) and core." if cohort.regional is not None else "")
    note = (f"{_protocol(folds, repeats)} R²: ridge regression; accuracy, 1-off accuracy "
            f"(within one grade) and AUC: multinomial logistic regression. Standardisation and "
            f"regularisation strength are fitted inside the training folds (an inner "
            f"{INNER_FOLDS}-fold cross-validation). Density measures: {density}."
            f"{regional}{ceiling} Subjects per task: {subjects}. {notes}").strip()
    return Table(title, columns, rows, note)


def _seeds(cohort: Cohort, row: str) -> int:
    """Pretraining seeds behind a row (1 for the measures and the truths)."""
    method = row.removeprefix("density + ")
    return len(cohort.features[method]) if method in cohort.features else 1
