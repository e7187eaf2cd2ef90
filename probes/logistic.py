"""Logistic probes for categorical labels (on/off-policy, topic, ...), with grouped CV.

Per-token or per-sequence labels both work: a per-sequence label is repeated on its tokens, and
the folds are grouped by sequence either way.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted
from surprise_probe.probes.folds import assign_folds
from surprise_probe.probes.ridge import validate_data

from surprise_probe.core.utils.stats import ratio_with_ci, unit_sums

__all__ = ["LogisticProbe", "cross_validate_classifier"]


class LogisticProbe(ClassifierMixin, BaseEstimator):
    """L2 logistic regression on standardised features; ``coef_`` acts on raw activations.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 5)); labels = (X[:, 0] > 0).astype(int)
    >>> LogisticProbe(C=1.0).fit(X, labels).score(X, labels) > 0.95
    True
    """

    # No annotations or checks here (the scikit-learn contract: __init__ stores, fit validates).
    def __init__(self, C=1.0, standardize=True, max_iter=1000, class_weight=None):
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.class_weight = class_weight

    # X: an array-like (the scikit-learn contract), validated by validate_data.
    def fit(self, X, y) -> LogisticProbe:
        X, y = validate_data(self, X, y, dtype=np.float64)
        self.mean_ = X.mean(0)
        scale = X.std(0) if self.standardize else np.ones(X.shape[1])
        scale[scale == 0] = 1.0
        self.scale_ = scale
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        model.fit((X - self.mean_) / self.scale_, y)
        self.classes_ = model.classes_
        self.coef_ = model.coef_ / self.scale_  # activation space
        self.intercept_ = model.intercept_ - self.coef_ @ self.mean_
        self.n_iter_ = model.n_iter_
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X) -> Float[np.ndarray, "n classes"]:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            positive = 1 / (1 + np.exp(-scores))
            return np.stack([1 - positive, positive], axis=1)
        scores = scores - scores.max(1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def cross_validate_classifier(
    X: Float[np.ndarray, "n d"],
    labels,
    sequence_ids: Int[np.ndarray, " n"],
    *,
    n_folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    **probe_params,
) -> dict:
    """Held-out accuracy of a :class:`LogisticProbe` with folds grouped by sequence.

    Returns the out-of-fold predictions, accuracy with a sequence-bootstrap CI, and the
    majority-class accuracy (the chance level learned on each training fold), both with
    ``level`` intervals over sequences.
    """
    X = np.asarray(X)
    labels = np.asarray(labels)
    sequence_ids = np.asarray(sequence_ids)
    if not (len(X) == len(labels) == len(sequence_ids)):
        raise ValueError(
            f"X, labels and sequence_ids need one length, got {len(X)}, {len(labels)}, {len(sequence_ids)}"
        )
    if len(np.unique(labels)) < 2:
        raise ValueError(
            f"labels have a single class ({labels[0]!r}); a classifier needs at least two"
        )
    folds = assign_folds(sequence_ids, n_folds, seed)
    predicted = np.empty_like(labels)
    majority = np.empty_like(labels)
    for fold in range(n_folds):
        train, test = folds != fold, folds == fold
        if len(np.unique(labels[train])) < 2:
            raise ValueError(f"fold {fold}'s training tokens hold one class only; use fewer folds")
        probe = LogisticProbe(**probe_params).fit(X[train], labels[train])
        predicted[test] = probe.predict(X[test])
        values, counts = np.unique(labels[train], return_counts=True)
        majority[test] = values[np.argmax(counts)]

    _, correct, counts = unit_sums((predicted == labels).astype(float), sequence_ids)
    _, chance, _ = unit_sums((majority == labels).astype(float), sequence_ids)
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    return {
        "accuracy": ratio_with_ci(correct, counts, **boot),
        "majority_accuracy": ratio_with_ci(chance, counts, **boot),
        "predictions": predicted,
        "folds": folds,
    }
