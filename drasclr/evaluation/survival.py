"""Survival: Cox proportional hazards on image features and confounders, scored by the
time-dependent concordance index (Yu et al. 2023, Table 3).

The C-index is Uno's IPCW estimator truncated at a horizon (scikit-survival's
``concordance_index_ipcw``: the censoring distribution is estimated on the training fold, the
pairs are those of the held-out fold), at the 25th, 50th and 75th percentiles of the follow-up
time, the paper's censoring period quantiles. It is the mean over repeated stratified K-fold
cross-validation (and over the pretraining seeds of a method) of the held-out folds' C-index;
its standard error is that of the same mean, from the spread of the per-split values with the
repeated-CV correction for overlapping training sets (``drasclr.evaluation.paired``). A fold
without a death before the horizon has no C-index: such folds are counted and named in the
table, not averaged in. Every row uses the same splits, so rows are compared by a paired test
on them.

Many image features and few deaths: each feature set is standardised and reduced to a few
principal components inside the training folds, and the Cox model carries a small ridge
penalty, so that no fold's fit diverges.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.exceptions import NoComparablePairException
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_ipcw
from sksurv.util import Surv

from drasclr.evaluation.data import CONFOUNDERS, Cohort
from drasclr.evaluation.paired import corrected_standard_error
from drasclr.evaluation.readout import DENSITY_ROW, REGIONAL_ROW, TRUTH_ROW
from drasclr.evaluation.report import Estimate, Table

#: Horizons: percentiles of the follow-up time.
PERCENTILES = (25, 50, 75)
#: Principal components kept of each feature set, and the Cox model's ridge penalty.
COMPONENTS = 4
COX_ALPHA = 1.0
CONFOUNDERS_ROW = "confounders"
SPIROMETRY_ROW = "confounders + spirometry"


def time_dependent_cindex(train_time: np.ndarray, train_event: np.ndarray,
                          test_time: np.ndarray, test_event: np.ndarray, risk: np.ndarray,
                          horizon: float) -> float:
    """Uno's C-index of ``risk`` (higher: earlier death) on the test subjects, truncated at
    ``horizon``, with censoring weights from the training subjects; NaN without a comparable
    pair (no death before the horizon)."""
    if not (test_event & (test_time < horizon)).any():
        return float("nan")
    try:
        return float(concordance_index_ipcw(
            Surv.from_arrays(train_event, train_time), Surv.from_arrays(test_event, test_time),
            risk, tau=horizon)[0])
    except NoComparablePairException:
        return float("nan")


def cox_model(n_covariates: int, n_image: int, *, components: int = COMPONENTS,
              alpha: float = COX_ALPHA) -> Pipeline:
    """Cox model on ``n_covariates`` standardised columns followed by ``n_image`` image
    feature columns, standardised and reduced to ``components`` principal components."""
    blocks = [("covariates", StandardScaler(), np.arange(n_covariates))] if n_covariates else []
    if n_image:
        reduce = make_pipeline(StandardScaler(),
                               PCA(min(components, n_image), svd_solver="full"))
        blocks.append(("image", reduce, np.arange(n_covariates, n_covariates + n_image)))
    return make_pipeline(ColumnTransformer(blocks), CoxPHSurvivalAnalysis(alpha=alpha))


def follow_up_horizons(time: np.ndarray) -> dict[int, float]:
    """Percentile -> horizon (the same time unit as ``time``)."""
    return {q: float(np.percentile(time, q)) for q in PERCENTILES}


@dataclass
class SurvivalScore:
    """One row's C-index per horizon percentile.

    Attributes:
        cindex: percentile -> mean over every (seed, split) with its standard error.
        per_split: percentile -> (splits,) C-index averaged over the seeds, NaN for a fold
            without a death before the horizon: the paired tests' input.
        risk_group: the risk tertile (0 low .. 2 high) of every subject when held out in the
            first seed's first repeat (cut at its training fold's risk tertiles).
    """

    cindex: dict[int, Estimate]
    per_split: dict[int, np.ndarray]
    risk_group: np.ndarray


def survival_splits(event: np.ndarray, *, folds: int = 5, repeats: int = 5,
                    seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``repeats`` x ``folds`` (train, test) index pairs stratified by death."""
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return list(splitter.split(np.zeros((len(event), 1)), event))


def cross_validate_survival(X: np.ndarray | Sequence[np.ndarray], n_image: int,
                            time: np.ndarray, event: np.ndarray, horizons: dict[int, float], *,
                            folds: int = 5, repeats: int = 5, seed: int = 0,
                            components: int = COMPONENTS, alpha: float = COX_ALPHA
                            ) -> SurvivalScore:
    """Repeated stratified (by death) K-fold C-index of :func:`cox_model` on ``X`` (one matrix
    or one per pretraining seed), whose last ``n_image`` columns are image features.

    Each (repeat, fold) gives the held-out fold's C-index with censoring weights from its
    training fold; the estimate is their mean over every seed and split, its standard error
    the repeated-CV corrected one of the per-split means over the seeds.
    """
    matrices = [X] if isinstance(X, np.ndarray) else list(X)
    y = Surv.from_arrays(event, time)
    splits = survival_splits(event, folds=folds, repeats=repeats, seed=seed)
    values = {q: np.empty((len(matrices), len(splits))) for q in horizons}
    risk_group = np.zeros(len(time), dtype=np.int64)
    for i, matrix in enumerate(matrices):
        for split, (train, test) in enumerate(splits):
            model = cox_model(matrix.shape[1] - n_image, n_image, components=components,
                              alpha=alpha)
            model.fit(matrix[train], y[train])
            risk = model.predict(matrix[test])
            for q, horizon in horizons.items():
                values[q][i, split] = time_dependent_cindex(
                    time[train], event[train], time[test], event[test], risk, horizon)
            if i == 0 and split < folds:
                cuts = np.percentile(model.predict(matrix[train]), [100 / 3, 200 / 3])
                risk_group[test] = np.searchsorted(cuts, risk)
    # A split without a death before the horizon is NaN for every seed (the held-out fold is
    # the same), so the seed mean keeps it NaN and the overall mean leaves it out.
    per_split = {q: v.mean(axis=0) for q, v in values.items()}
    cindex = {q: Estimate(float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any()
                          else float("nan"), corrected_standard_error(per_split[q], folds),
                          tuple(float(x) for x in v.ravel()))
              for q, v in values.items()}
    return SurvivalScore(cindex, per_split, risk_group)


def splits_without_deaths(time: np.ndarray, event: np.ndarray, horizons: dict[int, float], *,
                          folds: int, repeats: int, seed: int) -> dict[int, list[str]]:
    """Percentile -> the splits ('repeat r fold k', 1-based) whose held-out fold has no death
    before the horizon, so no C-index; the same for every row."""
    splits = survival_splits(event, folds=folds, repeats=repeats, seed=seed)
    return {q: [f"repeat {s // folds + 1} fold {s % folds + 1}"
                for s, (_, test) in enumerate(splits)
                if not (event[test] & (time[test] < horizon)).any()]
            for q, horizon in horizons.items()}


def survival_rows(cohort: Cohort) -> dict[str, tuple[list[np.ndarray], int]]:
    """Row name -> (covariates then image features, one matrix per seed; number of image
    feature columns). Every row holds the confounders."""
    data = cohort.survival
    confounders, spirometry = data.confounders, data.spirometry
    rows = {CONFOUNDERS_ROW: ([confounders], 0)}
    rows.update({f"confounders + {name}": ([np.hstack([confounders, f]) for f in seeds],
                                           seeds[0].shape[1])
                 for name, seeds in cohort.features.items()})
    rows[f"confounders + {DENSITY_ROW}"] = ([np.hstack([confounders, cohort.density])], 0)
    if cohort.regional is not None:
        rows[f"confounders + {REGIONAL_ROW}"] = ([np.hstack([confounders, cohort.regional])], 0)
    if cohort.truth is not None:
        rows[f"confounders + {TRUTH_ROW}"] = ([np.hstack([confounders, cohort.truth])], 0)
    rows[SPIROMETRY_ROW] = ([np.hstack([confounders, spirometry])], 0)
    rows.update({f"confounders + spirometry + {name}":
                 ([np.hstack([confounders, spirometry, f]) for f in seeds], seeds[0].shape[1])
                 for name, seeds in cohort.features.items()})
    return rows


def survival(cohort: Cohort, *, folds: int = 5, repeats: int = 5,
             seed: int = 0) -> dict[str, SurvivalScore]:
    """Row name -> :class:`SurvivalScore`; every row uses the same splits and horizons."""
    data = cohort.survival
    horizons = follow_up_horizons(data.time)
    return {name: cross_validate_survival(matrices, n_image, data.time, data.event, horizons,
                                          folds=folds, repeats=repeats, seed=seed)
            for name, (matrices, n_image) in survival_rows(cohort).items()}


def survival_table(results: dict[str, SurvivalScore], cohort: Cohort, *, folds: int,
                   repeats: int, seed: int) -> Table:
    """The paper's layout: one row per model, the C-index at each horizon."""
    data = cohort.survival
    horizons = follow_up_horizons(data.time)
    columns = ["Model"] + [f"C-index, {q}th pct ({h:.1f})" for q, h in horizons.items()]
    rows = [[name] + [score.cindex[q] for q in horizons] for name, score in results.items()]
    missing = splits_without_deaths(data.time, data.event, horizons, folds=folds,
                                    repeats=repeats, seed=seed)
    gaps = "; ".join(f"{q}th pct: {len(names)} of {folds * repeats}"
                     + (f" ({', '.join(names)})" if names else "")
                     for q, names in missing.items())
    deaths = int(data.event.sum())
    note = (f"Uno's IPCW C-index truncated at the horizon (a percentile of the follow-up time, "
            f"in the table's time unit), on held-out folds of {repeats} × {folds}-fold "
            f"cross-validation stratified by death (the same splits for every row): mean over "
            f"every (seed, split) ± its standard error, from the spread of the per-split values "
            f"corrected for overlapping training sets (√((1/J + 1/(K−1)) · variance) over J "
            f"splits of K folds). Folds without a death before the horizon have no C-index and "
            f"are left out of the mean: {gaps}. Cox proportional hazards (ridge penalty "
            f"{COX_ALPHA:g}) on standardised covariates; each feature set reduced to "
            f"{COMPONENTS} principal components inside the training folds. Confounders, in "
            f"every row: {', '.join(c.replace('_', ' ') for c in CONFOUNDERS)}. Spirometry: "
            f"FEV1pp, GOLD stage, PRISm. {len(data.time)} subjects, {deaths} deaths.")
    return Table("Survival: time-dependent concordance index", columns, rows, note)
