"""Paired comparison of two rows scored on the same cross-validation splits (Yu et al. 2023,
Tables A.5-A.7 compare methods by paired tests).

The test is the paired t-test on the per-split differences, with the variance corrected for
repeated K-fold cross-validation (Nadeau and Bengio 2003; Bouckaert and Frank 2004): the splits
share most of their training subjects, so their differences are correlated and the plain
paired t-test (variance / J) would find differences that are not there. The corrected variance
is (1/J + n_test/n_train) times the sample variance of the J differences, n_test/n_train =
1/(K - 1) for K folds; the p-value is two-sided, from Student's t with J - 1 degrees of freedom
(``scipy.stats.t``). Splits where either row has no value (a survival fold without a death
before the horizon) are left out of the pair.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from drasclr.evaluation.report import PairedDifference

TEST_NAME = "corrected repeated-CV paired t-test (Nadeau-Bengio), two-sided"


def corrected_variance_factor(splits: int, folds: int) -> float:
    """(1/J + n_test/n_train) for J splits of K-fold cross-validation."""
    return 1.0 / splits + 1.0 / (folds - 1)


def corrected_standard_error(values: np.ndarray, folds: int) -> float:
    """Standard error of the mean of per-split values of repeated K-fold cross-validation,
    corrected for the overlap of the training sets; NaN values are left out."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan")
    return float(np.sqrt(corrected_variance_factor(values.size, folds) * values.var(ddof=1)))


def paired_difference(a: np.ndarray, b: np.ndarray, folds: int) -> PairedDifference:
    """Mean of ``a - b`` over the splits both have, and the corrected paired t-test's p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test: {a.shape} and {b.shape} splits; compare rows scored on "
                         f"the same splits")
    difference = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if difference.size < 2:
        return PairedDifference(float("nan"), float("nan"))
    mean = float(difference.mean())
    se = corrected_standard_error(difference, folds)
    if se == 0:
        return PairedDifference(mean, 1.0 if mean == 0 else 0.0)
    p = 2.0 * float(stats.t.sf(abs(mean) / se, difference.size - 1))
    return PairedDifference(mean, p)
