"""Survival: Cox proportional hazards on image features and confounders, scored by the
time-dependent concordance index (Yu et al. 2023, Table 3).

The C-index is Uno's IPCW estimator truncated at a horizon (scikit-survival's
``concordance_index_ipcw``: the censoring distribution is estimated on the training fold, the
pairs are those of the held-out fold), at the 25th, 50th and 75th percentiles of the follow-up
time, the paper's censoring period quantiles. It is averaged over repeated stratified K-fold
cross-validations; its standard error is the SD of bootstrap replicates over the subjects'
held-out predictions (seeded; see :func:`cross_validate_survival`).

Many image features and few deaths: each feature set is standardised and reduced to a few
principal components inside the training folds, and the Cox model carries a small ridge
penalty, so that no fold's fit diverges.
"""
from __future__ import annotations

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

from drasclr.evaluation.data import Cohort
from drasclr.evaluation.report import Estimate, Table

#: Horizons: percentiles of the follow-up time.
PERCENTILES = (25, 50, 75)
#: Principal components kept of each feature set, and the Cox model's ridge penalty.
COMPONENTS = 4
COX_ALPHA = 1.0
#: Bootstrap replicates of the standard error (its own relative precision is about 10 %).
BOOTSTRAP = 50
SPIROMETRY_ROW = "spirometry (FEV1pp, GOLD)"


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
    """One row's C-index per horizon percentile, and the risk tertile (0 low .. 2 high) of every
    subject when held out in the first repeat (cut at its training fold's risk tertiles)."""

    cindex: dict[int, Estimate]
    risk_group: np.ndarray


def cross_validate_survival(X: np.ndarray, n_image: int, time: np.ndarray, event: np.ndarray,
                            horizons: dict[int, float], *, folds: int = 5, repeats: int = 5,
                            seed: int = 0, bootstrap: int = BOOTSTRAP,
                            components: int = COMPONENTS, alpha: float = COX_ALPHA
                            ) -> SurvivalScore:
    """Repeated stratified (by death) K-fold C-index of :func:`cox_model` on ``X``, whose last
    ``n_image`` columns are image features.

    The estimate is the mean over every (repeat, fold) of the held-out fold's C-index with
    censoring weights from its training fold. Its standard error is the SD of bootstrap
    replicates: each resamples the subjects and averages, over the repeats, the C-index of
    the repeat's held-out risks (every subject predicted by the model that did not see it),
    with censoring weights from the whole cohort. Pooling the folds here costs one C-index per
    repeat instead of one per fold, with the same held-out predictions.
    """
    y = Surv.from_arrays(event, time)
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    values: dict[int, list[float]] = {q: [] for q in horizons}
    held_out_risk = np.empty((repeats, len(time)))
    risk_group = np.zeros(len(time), dtype=np.int64)
    for split, (train, test) in enumerate(splitter.split(X, event)):
        model = cox_model(X.shape[1] - n_image, n_image, components=components, alpha=alpha)
        model.fit(X[train], y[train])
        risk = model.predict(X[test])
        held_out_risk[split // folds, test] = risk
        for q, horizon in horizons.items():
            values[q].append(time_dependent_cindex(time[train], event[train], time[test],
                                                   event[test], risk, horizon))
        if split < folds:
            cuts = np.percentile(model.predict(X[train]), [100 / 3, 200 / 3])
            risk_group[test] = np.searchsorted(cuts, risk)

    rng = np.random.default_rng(seed)
    replicates: dict[int, list[float]] = {q: [] for q in horizons}
    for _ in range(bootstrap):
        draw = rng.integers(0, len(time), len(time))
        for q, horizon in horizons.items():
            replicates[q].append(np.nanmean([
                time_dependent_cindex(time, event, time[draw], event[draw], risk[draw], horizon)
                for risk in held_out_risk]))
    se = {q: float(np.nanstd(replicates[q], ddof=1)) if bootstrap > 1 else float("nan")
          for q in horizons}
    cindex = {q: Estimate(float(np.nanmean(values[q])), se[q], tuple(values[q])) for q in horizons}
    return SurvivalScore(cindex, risk_group)


def survival_rows(cohort: Cohort) -> dict[str, tuple[np.ndarray, int]]:
    """Row name -> (covariates then image features, number of image feature columns)."""
    data = cohort.survival
    confounders, spirometry = data.confounders, data.spirometry
    rows = {"confounders": (confounders, 0)}
    rows.update({f"confounders + {name}": (np.hstack([confounders, f]), f.shape[1])
                 for name, f in cohort.features.items()})
    rows["confounders + density measures"] = (np.hstack([confounders, cohort.density]), 0)
    rows[SPIROMETRY_ROW] = (spirometry, 0)
    rows.update({f"confounders + {name} + spirometry":
                 (np.hstack([confounders, spirometry, f]), f.shape[1])
                 for name, f in cohort.features.items()})
    return rows


def survival(cohort: Cohort, *, folds: int = 5, repeats: int = 5, seed: int = 0,
             bootstrap: int = BOOTSTRAP) -> dict[str, SurvivalScore]:
    """Row name -> :class:`SurvivalScore`; every row uses the same splits and horizons."""
    data = cohort.survival
    horizons = follow_up_horizons(data.time)
    return {name: cross_validate_survival(X, n_image, data.time, data.event, horizons,
                                          folds=folds, repeats=repeats, seed=seed,
                                          bootstrap=bootstrap)
            for name, (X, n_image) in survival_rows(cohort).items()}


def survival_table(results: dict[str, SurvivalScore], cohort: Cohort, *, folds: int,
                   repeats: int, bootstrap: int) -> Table:
    """The paper's layout: one row per model, the C-index at each horizon."""
    horizons = follow_up_horizons(cohort.survival.time)
    columns = ["Model"] + [f"C-index, {q}th pct ({h:.1f})" for q, h in horizons.items()]
    rows = [[name] + [score.cindex[q] for q in horizons] for name, score in results.items()]
    deaths = int(cohort.survival.event.sum())
    note = (f"Uno's IPCW C-index truncated at the horizon (a percentile of the follow-up time, "
            f"in the table's time unit), on held-out folds: mean over {repeats} × {folds}-fold "
            f"cross-validation stratified by death ± bootstrap SE ({bootstrap} resamples of the "
            f"subjects' held-out predictions). Cox proportional hazards (ridge penalty "
            f"{COX_ALPHA:g}) on standardised covariates; each feature set reduced to "
            f"{COMPONENTS} principal components inside the training folds. Confounders: age, "
            f"sex, race, smoking status, pack-years. Spirometry: FEV1pp, GOLD stage, PRISm. "
            f"{len(cohort.survival.time)} subjects, {deaths} deaths.")
    return Table("Survival: time-dependent concordance index", columns, rows, note)
