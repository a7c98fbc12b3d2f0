"""KLEJ's four scores, written out in numpy so that each definition can be read in a few lines.

    accuracy    NKJP-NER, CDSC-E, PolEmo2.0-IN/OUT   share of exact matches
    binary_f1   CBD, DYK, PSC                        F1 of the positive class (label "1")
    spearman    CDSC-R                               Pearson correlation of the ranks (ties get their mean rank)
    ar_score    AR                                   1 - wMAE / 4, wMAE = mean over the true ratings of each
                                                     rating's mean absolute error (so rare ratings count as
                                                     much as common ones); /4 maps the 1-5 scale to 0-1

Degenerate inputs follow scikit-learn and scipy, so our numbers agree with theirs everywhere: F1 is 0 when there
is no positive example in either the truth or the predictions; Spearman's correlation is undefined (nan) when
either side is constant.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def binary_f1(y_true: np.ndarray, y_pred: np.ndarray, positive: int = 1) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    t, p = y_true == positive, y_pred == positive
    tp = np.sum(t & p)
    wrong = np.sum(t != p)               # false positives + false negatives
    # F1 = 2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall, without dividing by zero twice.
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (e.g. [10, 20, 20] -> [1, 2.5, 2.5])."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Each run of equal values is a group; its members all get (first rank + last rank) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]                                    # one past each group's last index
    group_rank = (starts + 1 + ends) / 2.0                              # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    a, b = rankdata(y_true), rankdata(y_pred)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")


def ar_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    errors = np.abs(y_pred.astype(np.float64) - y_true)
    per_rating = [errors[y_true == rating].mean() for rating in np.unique(y_true)]
    return float(1.0 - np.mean(per_rating) / 4.0)


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"expected two 1-d arrays of one length, got shapes {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot score zero examples")
    return y_true, y_pred


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "binary_f1": binary_f1, "spearman": spearman, "ar_score": ar_score,
}
