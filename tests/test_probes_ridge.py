"""Streamed closed-form ridge against scikit-learn, and the estimator contract."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.model_selection import cross_val_score
from sklearn.preprocessing import StandardScaler
from surprise_probe.probes import GroupedKFold, RidgeProbe, RidgeStats, heldout_sums, solve_ridge


def _data(seed=0, n=600, d=24):
    rng = np.random.default_rng(seed)
    # large offsets and very different scales, like residual streams with outlier dimensions
    X = rng.normal(size=(n, d)) * rng.uniform(0.05, 20, d) + rng.normal(size=d) * 100
    y = X @ rng.normal(size=d) / 10 + rng.normal(size=n) + 5
    return X, y


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("standardize", [True, False])
def test_streamed_solution_equals_sklearn_ridge(standardize):
    X, y = _data()
    alphas = [1e-2, 1.0, 30.0, 1e4]
    stats = RidgeStats(X.shape[1], 1, shift_x=X[:50].mean(0), shift_y=[y[:50].mean()])
    for rows in np.array_split(np.arange(len(X)), 7):
        stats.update(X[rows], y[rows])
    solution = solve_ridge(stats, alphas, standardize=standardize)
    Z = StandardScaler().fit_transform(X) if standardize else X
    for a, alpha in enumerate(alphas):
        reference = Ridge(alpha=alpha).fit(Z, y)
        coef = solution.coef[a, 0] * (solution.feature_scale if standardize else 1.0)
        assert _rel(coef, reference.coef_) <= 1e-6
        assert (
            _rel(X @ solution.coef[a, 0] + solution.intercept[a, 0], reference.predict(Z)) <= 1e-6
        )


def test_heldout_sums_equal_direct_computation():
    X, y = _data(1)
    train, test = slice(0, 400), slice(400, None)
    shift_x, shift_y = X[:10].mean(0), np.array([y[:10].mean(), 0.0])
    Y = np.stack([y, -2 * y + 1], axis=1)
    stats_train = RidgeStats(X.shape[1], 2, shift_x, shift_y).update(X[train], Y[train])
    stats_test = RidgeStats(X.shape[1], 2, shift_x, shift_y).update(X[test], Y[test])
    solution = solve_ridge(stats_train, [0.1, 10.0])
    sums = heldout_sums(stats_test, solution)
    for a in range(2):
        for t in range(2):
            prediction = X[test] @ solution.coef[a, t] + solution.intercept[a, t]
            sse = np.sum((Y[test, t] - prediction) ** 2)
            assert sums["sse"][a, t] == pytest.approx(sse, rel=1e-8)
            centred = prediction - shift_y[t]
            assert sums["sum_pp"][a, t] == pytest.approx(np.sum(centred**2), rel=1e-8)


def test_stats_add_and_subtract_like_the_rows_they_hold():
    X, y = _data(2, n=100, d=5)
    a = RidgeStats(5).update(X[:60], y[:60])
    b = RidgeStats(5).update(X[60:], y[60:])
    total = RidgeStats(5).update(X, y)
    np.testing.assert_allclose((a + b).xtx, total.xtx)
    np.testing.assert_allclose((total - b).xty, a.xty)
    with pytest.raises(ValueError, match="different shifts"):
        a + RidgeStats(5, shift_x=np.ones(5))


def test_ridge_rejects_nonpositive_alpha():
    X, y = _data(3, n=50, d=4)
    with pytest.raises(ValueError, match=r"alphas must be finite and > 0, got \[0.0\]"):
        solve_ridge(RidgeStats(4).update(X, y), [0.0])


def test_ridge_probe_follows_the_estimator_contract():
    X, y = _data(4)
    probe = RidgeProbe(alpha=3.0)
    assert probe.get_params() == {"alpha": 3.0, "standardize": True}
    assert clone(probe).set_params(alpha=5.0).alpha == 5.0
    assert not hasattr(probe, "coef_")
    assert probe.fit(X, y) is probe
    reference = Ridge(alpha=3.0).fit(StandardScaler().fit_transform(X), y)
    assert _rel(probe.coef_ * probe.scale_, reference.coef_) <= 1e-6
    assert probe.score(X, y) > 0.9
    assert np.linalg.norm(probe.direction_) == pytest.approx(1.0)


def test_ridge_probe_works_in_cross_val_score_with_grouped_folds():
    X, y = _data(5)
    groups = np.repeat(np.arange(60), 10)
    scores = cross_val_score(RidgeProbe(alpha=1.0), X, y, groups=groups, cv=GroupedKFold(5, seed=0))
    assert scores.shape == (5,)
    assert np.all(scores > 0.9)
    # and a target unrelated to X scores near zero (the score can fail)
    noise = np.random.default_rng(0).normal(size=len(y))
    noise_scores = cross_val_score(
        RidgeProbe(alpha=100.0), X, noise, groups=groups, cv=GroupedKFold(5, seed=0)
    )
    assert np.all(noise_scores < 0.1)
