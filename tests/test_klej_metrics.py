"""KLEJ metrics against scikit-learn and scipy (test-only oracles) on random data and on the degenerate cases."""
import warnings

import numpy as np
import pytest
from scipy.stats import rankdata as scipy_rankdata
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error

from klej.metrics import METRICS, accuracy, ar_score, binary_f1, rankdata, spearman


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 6, size=rng.integers(1, 300))
    y_pred = rng.integers(0, 6, size=len(y_true))
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)


def test_accuracy_with_a_class_absent_from_predictions():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, size=100)
    y_pred = rng.integers(0, 3, size=100)          # class 3 is never predicted
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_binary_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=rng.integers(1, 300))
    y_pred = rng.integers(0, 2, size=len(y_true))
    assert binary_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize("case", ["no positive predicted", "no positive anywhere", "all positive", "one example"])
def test_binary_f1_degenerate_cases_match_sklearn(case):
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 2, size=50)
    y_pred = np.zeros(50, dtype=int)
    if case == "no positive anywhere":
        y_true = np.zeros(50, dtype=int)
    elif case == "all positive":
        y_pred = np.ones(50, dtype=int)
    elif case == "one example":
        y_true, y_pred = np.array([1]), np.array([0])
    expected = f1_score(y_true, y_pred, zero_division=0.0)
    assert binary_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 10, size=rng.integers(1, 200)).astype(float)   # many ties
    np.testing.assert_array_equal(rankdata(x), scipy_rankdata(x, method="average"))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(3, 300)
    y_true = np.round(rng.uniform(0, 5, size=n) * 2) / 2       # CDSC-R-like scores, with ties
    y_pred = y_true + rng.normal(0, 1.5, size=n)
    assert spearman(y_true, y_pred) == pytest.approx(spearmanr(y_true, y_pred).statistic, abs=1e-12)


@pytest.mark.parametrize("constant", ["predictions", "truth", "both"])
def test_spearman_of_a_constant_side_is_nan_like_scipy(constant):
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.uniform(0, 5, size=40), rng.uniform(0, 5, size=40)
    if constant in ("predictions", "both"):
        y_pred = np.full(40, 2.5)
    if constant in ("truth", "both"):
        y_true = np.full(40, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # scipy warns that the correlation is undefined: that is the point
        expected = spearmanr(y_true, y_pred).statistic
    assert np.isnan(expected) and np.isnan(spearman(y_true, y_pred))


def _ar_score_reference(y_true, y_pred):
    """KLEJ's published definition: ratings mapped to [0, 1], MAE per true rating, averaged, 1 minus that."""
    t, p = (y_true - 1.0) / 4.0, (y_pred - 1.0) / 4.0
    return 1 - np.mean([mean_absolute_error(t[t == v], p[t == v]) for v in np.unique(t)])


@pytest.mark.parametrize("seed", range(5))
def test_ar_score_matches_the_klej_definition(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(1, 6, size=rng.integers(1, 300)).astype(float)
    y_pred = np.clip(y_true + rng.normal(0, 1.2, size=len(y_true)), 1, 5)
    assert ar_score(y_true, y_pred) == pytest.approx(_ar_score_reference(y_true, y_pred), abs=1e-12)


def test_ar_score_with_missing_ratings_and_constant_predictions():
    rng = np.random.default_rng(4)
    y_true = rng.choice([1.0, 5.0], size=60)        # ratings 2-4 absent: only present ones are averaged
    y_pred = np.full(60, 4.0)
    assert ar_score(y_true, y_pred) == pytest.approx(_ar_score_reference(y_true, y_pred), abs=1e-12)


def test_metrics_refuse_mismatched_or_empty_inputs():
    for metric in METRICS.values():
        with pytest.raises(ValueError, match="shapes"):
            metric(np.zeros(3), np.zeros(4))
        with pytest.raises(ValueError, match="zero examples"):
            metric(np.zeros(0), np.zeros(0))
