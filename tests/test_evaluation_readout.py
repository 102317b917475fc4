"""Linear readout (Yu et al. 2023, Tables 2 and 4): planted signals are recovered at their known
population level, and labels without signal score at chance even where leakage would show."""
import numpy as np
import pandas as pd
import pytest
from sklearn.feature_selection import SelectKBest, f_classif, f_regression
from sklearn.model_selection import KFold

from drasclr.data.synthetic import sample_clinical
from drasclr.evaluation.data import TASKS, Task, load_clinical
from drasclr.evaluation.readout import (
    INNER_FOLDS, RIDGE_ALPHAS, cross_validate_readout, one_off_accuracy, readout_model,
    readout_scores,
)
from drasclr.features import FeatureSet

REGRESSION = Task("y", "y", "y", "regression")
THREE_GRADES = Task("grade", "grade", "grade", "ordinal", grades=(0, 1, 2))


def test_one_off_accuracy_counts_predictions_within_one_grade():
    assert one_off_accuracy([0, 1, 2, 5, 3], [0, 2, 4, 4, 0]) == pytest.approx(3 / 5)


def test_planted_linear_signal_gives_its_population_r2():
    # y = X w + e with Var(X w) = |w|^2 = 1 and Var(e) = 1: the population R^2 is 0.5; with
    # 10 features and 320 training subjects the out-of-sample loss is about 3 % higher.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10))
    w = rng.normal(size=10)
    w /= np.linalg.norm(w)
    y = X @ w + rng.normal(size=400)
    result = cross_validate_readout(X, y, REGRESSION, folds=5, seed=0)
    assert result.scores["R²"].mean == pytest.approx(0.5, abs=0.06)
    assert len(result.scores["R²"].values) == 5
    assert np.corrcoef(result.predictions, X @ w)[0, 1] > 0.95  # out-of-fold, near the truth


def test_ridge_penalty_is_chosen_by_an_inner_k_fold_of_the_training_data():
    """The penalty minimises the squared error of an inner 3-fold split of the data the model
    is fitted on (standardised once, on all of it): checked against a float64 ridge written
    out in closed form, on more features than subjects (where leave-one-out picked
    near-interpolating penalties)."""
    rng = np.random.default_rng(10)  # leave-one-out picks another penalty here (316 for 100)
    X = rng.normal(size=(48, 128)) @ rng.normal(size=(128, 128)) * 0.05  # correlated, p > n
    y = X[:, :3].sum(axis=1) + rng.normal(scale=2.0, size=48)

    def ridge_prediction(Z_fit, y_fit, Z_new, alpha):  # with an unpenalised intercept
        centre = Z_fit.mean(0)
        Zc = Z_fit - centre
        w = np.linalg.solve(Zc.T @ Zc + alpha * np.eye(Zc.shape[1]), Zc.T @ (y_fit - y_fit.mean()))
        return (Z_new - centre) @ w + y_fit.mean()

    Z = (X - X.mean(0)) / X.std(0)
    inner = KFold(INNER_FOLDS, shuffle=True, random_state=3)
    errors = [np.mean([np.mean((ridge_prediction(Z[a], y[a], Z[b], alpha) - y[b]) ** 2)
                       for a, b in inner.split(Z)]) for alpha in RIDGE_ALPHAS]
    model = readout_model(REGRESSION, seed=3).fit(X, y)
    assert model[-1].alpha_ == RIDGE_ALPHAS[int(np.argmin(errors))]
    reference = ridge_prediction(Z, y, Z, model[-1].alpha_)
    np.testing.assert_allclose(model.predict(X), reference, rtol=1e-6, atol=1e-6)


def test_planted_classes_reach_the_bayes_accuracy():
    # Grades drawn from a multinomial logit: the best possible accuracy is E[max_k p_k],
    # computed here by Monte Carlo on a large sample of the same model.
    rng = np.random.default_rng(1)
    W = 1.5 * rng.normal(size=(4, 3))

    def draw(n):
        X = rng.normal(size=(n, 4))
        logits = X @ W
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
        return X, y, p

    bayes = draw(200_000)[2].max(1).mean()
    X, y, _ = draw(600)
    result = cross_validate_readout(X, y, THREE_GRADES, folds=5, seed=0)
    assert result.scores["accuracy"].mean == pytest.approx(bayes, abs=0.05)
    assert result.scores["1-off"].mean >= result.scores["accuracy"].mean


def test_binary_task_reports_accuracy_and_auc():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    scores = cross_validate_readout(X, y, TASKS["exacerbation"], folds=5, seed=0).scores
    assert set(scores) == {"accuracy", "AUC"}
    assert scores["AUC"].mean > 0.9 and scores["accuracy"].mean > 0.8


def test_no_signal_scores_at_chance_even_where_leakage_would_show():
    # Many features, few subjects: anything fitted on all subjects, held-out folds included,
    # would find "signal" in noise (shown by the leaky selection below). The readout fits
    # its scaler and chooses its regularisation inside the training folds only.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 1000))
    y = rng.normal(size=40)
    grades = rng.permutation(np.arange(40) % 3)

    r2 = cross_validate_readout(X, y, REGRESSION, folds=5, seed=0).scores["R²"].mean
    accuracy = cross_validate_readout(X, grades, THREE_GRADES, folds=5, seed=0
                                      ).scores["accuracy"].mean
    assert r2 <= 0.05
    assert accuracy < 1 / 3 + 0.2

    # The leak the readout must not have: a choice made on every subject before the folds.
    leaky_X = SelectKBest(f_regression, k=20).fit_transform(X, y)
    leaky_r2 = cross_validate_readout(leaky_X, y, REGRESSION, folds=5, seed=0).scores["R²"].mean
    leaky_X = SelectKBest(f_classif, k=20).fit_transform(X, grades)
    leaky_accuracy = cross_validate_readout(leaky_X, grades, THREE_GRADES, folds=5, seed=0
                                            ).scores["accuracy"].mean
    assert leaky_r2 > 0.3
    assert leaky_accuracy > 0.6


def test_a_grade_missing_from_a_training_fold_is_handled():
    # One subject of grade 2: the fold that holds it out never saw the grade.
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 3))
    y = np.r_[np.zeros(15, int), np.ones(14, int), 2]
    X[y == 1, 0] += 3
    result = cross_validate_readout(X, y, TASKS["cle"], folds=5, seed=0)
    assert result.scores["accuracy"].mean > 0.8
    assert set(result.predictions) <= {0, 1, 2}


def test_readout_scores_of_one_feature_set_against_a_clinical_table(tmp_path):
    rows = [{"subject_id": f"s{i:02d}", **sample_clinical(0, i)["clinical"]} for i in range(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "clinical.csv", index=False)
    clinical = load_clinical(tmp_path / "clinical.csv")
    severity = np.array([r["severity"] for r in rows])
    rng = np.random.default_rng(5)
    features = np.c_[severity, rng.normal(size=(40, 4))] + 0.05 * rng.normal(size=(40, 5))
    feature_set = FeatureSet([r["subject_id"] for r in rows][::-1], features[::-1],
                             {"name": "planted"})
    scores = readout_scores(feature_set, clinical, ["log_fev1pp", "gold"], folds=5, seed=0)
    assert set(scores) == {"log_fev1pp", "gold"}
    assert scores["log_fev1pp"].mean > 0.3  # severity drives FEV1pp in the generating model
    with pytest.raises(ValueError, match="survival not readout tasks"):
        readout_scores(feature_set, clinical, ["survival"])


# --- the protocol: repeated splits shared by every row, seeds, paired tests ------------------

def test_corrected_paired_test_is_the_paired_t_test_with_the_repeated_cv_variance():
    from scipy import stats

    from drasclr.evaluation.paired import paired_difference

    rng = np.random.default_rng(6)
    a, b = rng.normal(0.5, 0.1, 15), rng.normal(0.45, 0.1, 15)  # 3 x 5-fold
    plain = stats.ttest_rel(a, b)
    # Nadeau-Bengio: the variance of the mean is (1/J + 1/(K-1)) s^2 instead of s^2 / J.
    t = plain.statistic * np.sqrt((1 / 15) / (1 / 15 + 1 / 4))
    result = paired_difference(a, b, folds=5)
    assert result.difference == pytest.approx(np.mean(a - b), rel=1e-12)
    assert result.p == pytest.approx(2 * stats.t.sf(abs(t), 14), rel=1e-9)
    assert result.p > plain.pvalue  # more cautious than the plain paired test
    with pytest.raises(ValueError, match="the same splits"):
        paired_difference(a, b[:10], folds=5)


def test_planted_feature_beats_noise_and_shuffled_labels_do_not():
    # Rows scored on the same repeated splits: a planted feature against pure noise gets a
    # small p; with the labels shuffled, neither row predicts anything (R² at most about 0)
    # and their difference is not significant.
    from drasclr.evaluation.paired import paired_difference
    from drasclr.evaluation.readout import score_rows
    from drasclr.evaluation.data import Labels

    rng = np.random.default_rng(7)
    n = 60
    signal = rng.normal(size=n)
    y = signal + 0.7 * rng.normal(size=n)  # population R² 0.67
    planted = [np.c_[signal + 0.3 * rng.normal(size=n), rng.normal(size=(n, 9))]
               for _ in range(3)]
    noise = [rng.normal(size=(n, 10)) for _ in range(3)]
    rows = {"planted": planted, "noise": noise}
    for labels, expect_signal in ((y, True), (rng.permutation(y), False)):
        scored = score_rows(rows, {"y": Labels(REGRESSION, np.arange(n), labels)}, folds=5,
                            repeats=3, seed=0)
        first, second = (scored[r]["y"].per_split["R²"] for r in rows)
        difference = paired_difference(first, second, folds=5)
        if expect_signal:
            assert scored["planted"]["y"].scores["R²"].mean > 0.3
            assert difference.p < 0.01
        else:
            assert scored["planted"]["y"].scores["R²"].mean < 0.05
            assert scored["noise"]["y"].scores["R²"].mean < 0.05
            assert difference.p > 0.05


def test_every_row_is_scored_on_the_same_splits():
    # A row's per-split values are reproduced by scoring it alone on readout_splits' splits,
    # and two copies of one matrix under different names differ by exactly zero on every split.
    from drasclr.evaluation.data import Labels
    from drasclr.evaluation.readout import readout_splits, score_rows

    rng = np.random.default_rng(8)
    X = rng.normal(size=(45, 4))
    grades = (X[:, 0] + rng.normal(size=45) > 0).astype(int) + (X[:, 1] > 1)
    labels = {"grade": Labels(THREE_GRADES, np.arange(45), grades)}
    scored = score_rows({"a": [X], "b": [X.copy()], "c": [X[:, ::-1].copy()]}, labels,
                        folds=3, repeats=2, seed=4)
    np.testing.assert_array_equal(scored["a"]["grade"].per_split["accuracy"],
                                  scored["b"]["grade"].per_split["accuracy"])
    splits = readout_splits(grades, THREE_GRADES, folds=3, repeats=2, seed=4)
    assert len(splits) == 6
    for r in range(2):  # each repeat is a partition of the subjects
        tests = np.concatenate([test for _, test in splits[3 * r:3 * r + 3]])
        assert sorted(tests) == list(range(45))
    alone = cross_validate_readout(X[:, ::-1].copy(), grades, THREE_GRADES, folds=3, seed=4,
                                   splits=splits, repeats=2)
    np.testing.assert_array_equal(alone.per_split["accuracy"],
                                  scored["c"]["grade"].per_split["accuracy"])


def test_chance_accuracy_is_the_training_majority_on_each_split():
    from drasclr.evaluation.data import Labels
    from drasclr.evaluation.readout import chance_accuracy

    y = np.r_[np.zeros(6, int), np.ones(3, int)]
    splits = [(np.arange(3, 9), np.arange(3)), (np.arange(6), np.arange(6, 9))]
    # Training majority 0 (3 of 6) then 0 (6 of 6): tests [0,0,0] -> 1, [1,1,1] -> 0.
    np.testing.assert_array_equal(chance_accuracy(Labels(THREE_GRADES, np.arange(9), y), splits),
                                  [1.0, 0.0])
