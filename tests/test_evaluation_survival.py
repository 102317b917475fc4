"""Survival (Yu et al. 2023, Table 3): Uno's time-dependent C-index checked by hand, 0.5 for
random risk, and a Cox model that finds a planted hazard through reduced image features."""
import numpy as np
import pytest

from drasclr.evaluation.survival import (
    cross_validate_survival, follow_up_horizons, time_dependent_cindex,
)


def test_uno_cindex_at_a_horizon_matches_a_hand_computation():
    # Training fold: distinct times, censored at 2, 4, 6 and 8. Kaplan-Meier of the censoring:
    # G = 1 before 2; x 6/7 at 2 (7 at risk); x 4/5 at 4 (5 at risk); x 2/3 at 6 (3 at risk).
    train_time = np.arange(1.0, 9.0)
    train_event = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)
    # Held-out fold, horizon 5: deaths before it at 1.5, 2.5 and 4.5 (6.5 is past the horizon).
    test_time = np.array([1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    test_event = np.array([1, 1, 0, 1, 0, 1], bool)
    risk = np.array([0.9, 0.5, 0.6, 0.7, 0.1, 0.7])
    # Weights 1 / G(T_i)^2 of the deaths: G(1.5) = 1, G(2.5) = 6/7, G(4.5) = 24/35.
    w = {1.5: 1.0, 2.5: (7 / 6) ** 2, 4.5: (35 / 24) ** 2}
    # Pairs (i dies first, j lives longer): 1.5 beats all 5 later subjects; 2.5 outranks only
    # 5.5 of its 4 (risk 0.5 < 0.6, 0.7, 0.7); 4.5 outranks 5.5 and ties 6.5 (counts 1/2).
    concordant = w[1.5] * 5 + w[2.5] * 1 + w[4.5] * 1.5
    comparable = w[1.5] * 5 + w[2.5] * 4 + w[4.5] * 2
    cindex = time_dependent_cindex(train_time, train_event, test_time, test_event, risk, 5.0)
    assert cindex == pytest.approx(concordant / comparable, rel=1e-9)


def test_cindex_is_nan_without_a_death_before_the_horizon():
    train_time, train_event = np.arange(1.0, 9.0), np.ones(8, bool)
    value = time_dependent_cindex(train_time, train_event, np.array([3.0, 4.0]),
                                  np.array([True, False]), np.array([0.1, 0.2]), 2.0)
    assert np.isnan(value)


def test_cindex_of_random_risk_is_one_half():
    rng = np.random.default_rng(0)
    n = 4000
    event_time, censor_time = rng.exponential(5.0, n), rng.uniform(1.0, 10.0, n)
    time, event = np.minimum(event_time, censor_time), event_time <= censor_time
    horizon = follow_up_horizons(time)[50]
    cindex = time_dependent_cindex(time[:2000], event[:2000], time[2000:], event[2000:],
                                   rng.normal(size=2000), horizon)
    assert cindex == pytest.approx(0.5, abs=0.03)


def _planted_cohort(n=200, seed=0):
    """A latent severity drives the hazard and dominates 30 image features; confounders are
    noise. Returns confounders, image features, time, event."""
    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n)
    image = np.outer(severity, rng.normal(size=30)) + 0.5 * rng.normal(size=(n, 30))
    confounders = rng.normal(size=(n, 3))
    event_time = rng.exponential(1.0 / (0.1 * np.exp(1.2 * severity)))
    censor_time = rng.uniform(2.0, 15.0, n)
    return (confounders, image, np.minimum(event_time, censor_time), event_time <= censor_time)


def test_cox_on_reduced_image_features_finds_a_planted_hazard():
    confounders, image, time, event = _planted_cohort()
    horizons = follow_up_horizons(time)
    options = dict(folds=5, repeats=2, seed=0)
    with_image = cross_validate_survival(np.hstack([confounders, image]), image.shape[1], time,
                                         event, horizons, **options)
    without = cross_validate_survival(confounders, 0, time, event, horizons, **options)
    for q in (25, 50, 75):
        estimate = with_image.cindex[q]
        assert estimate.value > 0.7, q
        assert len(estimate.values) == 10 and 0 < estimate.se < 0.1
        assert without.cindex[q].value == pytest.approx(0.5, abs=0.08)
    # Held-out tertiles of predicted risk: the high-risk third dies more often.
    groups = with_image.risk_group
    assert set(groups) == {0, 1, 2}
    assert event[groups == 2].mean() > event[groups == 0].mean() + 0.2


def test_survival_cross_validation_is_seeded():
    confounders, image, time, event = _planted_cohort(n=80, seed=1)
    X, horizons = np.hstack([confounders, image]), follow_up_horizons(time)
    first, second = (cross_validate_survival(X, 30, time, event, horizons, repeats=1, seed=3)
                     for _ in range(2))
    assert first.cindex == second.cindex


def test_seeds_splits_and_folds_without_deaths():
    # Deaths only late: at the 25th-percentile horizon some held-out folds have no death before
    # it. Those splits are NaN for every row, named by splits_without_deaths, and left out of
    # the mean; the standard error is the repeated-CV corrected one of the per-split values.
    from drasclr.evaluation.paired import corrected_standard_error
    from drasclr.evaluation.survival import splits_without_deaths

    confounders, image, time, event = _planted_cohort(n=60, seed=2)
    early = time < np.percentile(time, 30)
    event = event & ~(early & (np.arange(60) % 4 != 0))  # few deaths before the horizon
    horizons = follow_up_horizons(time)
    seeds = [np.hstack([confounders, image + 0.1 * np.random.default_rng(s).normal(size=image.shape)])
             for s in range(2)]
    score = cross_validate_survival(seeds, 30, time, event, horizons, folds=5, repeats=2, seed=0)
    missing = splits_without_deaths(time, event, horizons, folds=5, repeats=2, seed=0)
    assert 0 < len(missing[25]) < 10
    gaps = np.isnan(score.per_split[25])
    assert [f"repeat {s // 5 + 1} fold {s % 5 + 1}" for s in np.flatnonzero(gaps)] == missing[25]
    values = np.reshape(score.cindex[25].values, (2, 10))  # every (seed, split), NaN kept
    assert np.array_equal(np.isnan(values), np.stack([gaps, gaps]))
    assert score.cindex[25].value == pytest.approx(np.nanmean(values))
    assert score.cindex[25].se == pytest.approx(corrected_standard_error(score.per_split[25], 5))


def test_planted_hazard_beats_noise_in_a_paired_test_and_shuffled_outcomes_do_not():
    from drasclr.evaluation.paired import paired_difference

    confounders, image, time, event = _planted_cohort(n=150, seed=3)
    noise = np.random.default_rng(9).normal(size=image.shape)
    horizons = follow_up_horizons(time)
    options = dict(folds=5, repeats=2, seed=0)
    shuffle = np.random.default_rng(10).permutation(len(time))
    for t, e, expect_signal in ((time, event, True), (time[shuffle], event[shuffle], False)):
        planted = cross_validate_survival(np.hstack([confounders, image]), 30, t, e, horizons,
                                          **options)
        other = cross_validate_survival(np.hstack([confounders, noise]), 30, t, e, horizons,
                                        **options)
        difference = paired_difference(planted.per_split[50], other.per_split[50], 5)
        if expect_signal:
            assert difference.difference > 0.1 and difference.p < 0.01
        else:
            assert planted.cindex[50].value == pytest.approx(0.5, abs=0.1)
            assert difference.p > 0.05
