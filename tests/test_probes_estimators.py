"""scikit-learn's own estimator checks on RidgeProbe and LogisticProbe (every check, none excluded)."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks
from surprise_probe.probes import LogisticProbe, RidgeProbe


@parametrize_with_checks([RidgeProbe(), LogisticProbe()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_ridge_probe_validates_alpha_in_fit(alpha):
    X, y = np.eye(3), np.arange(3.0)
    probe = RidgeProbe(alpha=alpha)  # construction stores, as scikit-learn requires
    with pytest.raises(ValueError, match=r"ridge alphas must be finite and > 0"):
        probe.fit(X, y)


def test_integer_targets_fit_like_floats():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = rng.integers(0, 5, size=40)
    np.testing.assert_array_equal(RidgeProbe().fit(X, y).predict(X), RidgeProbe().fit(X, y.astype(float)).predict(X))
