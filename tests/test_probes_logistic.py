"""Logistic probes for categorical labels, with grouped folds."""

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from surprise_probe.probes import GroupedKFold, LogisticProbe, cross_validate_classifier


def _labelled(seed=0, n_seq=40, length=8, d=5, signal=True):
    rng = np.random.default_rng(seed)
    sequence_ids = np.repeat(np.arange(n_seq), length)
    labels = np.repeat(
        rng.integers(0, 2, n_seq), length
    )  # one label per sequence (e.g. on/off-policy)
    X = rng.normal(size=(n_seq * length, d)) * 4 + 10
    if signal:
        X[:, 1] += 12 * labels
    return X, labels, sequence_ids


def test_logistic_probe_in_cross_val_score():
    X, labels, groups = _labelled()
    scores = cross_val_score(
        LogisticProbe(C=1.0), X, labels, groups=groups, cv=GroupedKFold(4, seed=0)
    )
    assert np.all(scores > 0.8)
    probe = LogisticProbe().fit(X, labels)
    assert probe.get_params()["C"] == 1.0
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1.0)
    assert np.argmax(np.abs(probe.coef_[0])) == 1


def test_cross_validate_classifier_against_majority_baseline():
    X, labels, groups = _labelled()
    found = cross_validate_classifier(X, labels, groups, n_folds=4, n_boot=100)
    assert found["accuracy"].value > 0.8 > found["majority_accuracy"].value
    X, labels, groups = _labelled(signal=False)
    null = cross_validate_classifier(X, labels, groups, n_folds=4, n_boot=100)
    assert null["accuracy"].value < 0.75
    with pytest.raises(ValueError, match="single class"):
        cross_validate_classifier(X, np.zeros(len(X)), groups)
