"""The one bootstrap (surprise_probe.core.utils.stats) against independent references: a brute-force loop
over resampled sequences' tokens, and scipy.stats.bootstrap called directly."""

import numpy as np
import pytest
import scipy.stats
from surprise_probe.probes.scoring import SequenceBootstrap

import surprise_probe as sp
from surprise_probe.core.utils import stats


def _tokens(seed=0, n_seq=25):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, n_seq)
    groups = np.repeat(np.arange(n_seq) * 7 + 3, lengths)  # ids not 0..n-1, to test the mapping
    values = rng.normal(size=len(groups)) + (groups % 5)
    return values, groups


def _brute_force(values, groups, statistic, n_boot, seed, level):
    """Resample sequence ids with the same generator calls, then recompute from their tokens."""
    ids = np.unique(groups)
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    boot = []
    for row in draws:
        picked = np.concatenate([np.flatnonzero(groups == ids[k]) for k in row])
        boot.append(statistic(values[picked]))
    tail = (1 - level) / 2
    return np.quantile(boot, tail), np.quantile(boot, 1 - tail)


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_bootstrap_mean_matches_a_brute_force_loop_over_sequences(level):
    values, groups = _tokens()
    ci = sp.bootstrap_mean(values, groups, n_boot=300, level=level, seed=4)
    low, high = _brute_force(values, groups, np.mean, 300, 4, level)
    assert ci.mean == pytest.approx(values.mean(), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert (ci.n_units, ci.n_tokens, ci.level) == (25, len(values), level)
    assert isinstance(ci, sp.MeanWithCI) and sp.metrics.MeanWithCI is sp.MeanWithCI


def test_bootstrap_sums_equals_scipy_bootstrap_on_unit_values():
    # with one token per unit the ratio of sums is a plain mean, which scipy bootstraps directly
    x = np.random.default_rng(1).exponential(size=40)
    ours = stats.bootstrap_sums(np.divide, x, np.ones_like(x), n_boot=500, level=0.9, seed=7)
    theirs = scipy.stats.bootstrap(
        (x,), np.mean, n_resamples=500, confidence_level=0.9, method="percentile",
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert ours[0] == pytest.approx(x.mean())
    assert ours[1:] == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_batching_does_not_change_the_resamples(monkeypatch):
    values, groups = _tokens(2)
    _, sums, counts = stats.unit_sums(values, groups)
    whole = stats.bootstrap_sums(np.divide, sums, counts, n_boot=200, seed=3)
    monkeypatch.setattr(stats, "_MAX_BLOCK", 3 * len(sums))  # 3 resamples per batch
    assert stats.bootstrap_sums(np.divide, sums, counts, n_boot=200, seed=3) == whole


def test_slope_with_ci_matches_a_brute_force_loop():
    rng = np.random.default_rng(5)
    x = np.array([-2.0, 0.0, 1.0, 4.0])
    counts = rng.integers(1, 9, 30).astype(float)
    sums = (rng.normal(size=(4, 30)) + 0.3 * x[:, None]) * counts
    est = stats.slope_with_ci(x, sums, counts, n_boot=250, level=0.9, seed=2)
    draws = np.random.default_rng(2).integers(0, 30, (250, 30))
    boot = [np.polyfit(x, sums[:, d].sum(1) / counts[d].sum(), 1)[0] for d in draws]
    assert est.value == pytest.approx(np.polyfit(x, sums.sum(1) / counts.sum(), 1)[0], abs=1e-12)
    assert (est.low, est.high) == pytest.approx(tuple(np.quantile(boot, [0.05, 0.95])), abs=1e-12)
    with pytest.raises(ValueError, match="two distinct x"):
        stats.slope_with_ci(np.array([1.0, 1.0]), sums[:2], counts)


def test_sequence_bootstrap_r2_and_pearson_match_a_brute_force_loop():
    values, groups = _tokens(3)
    prediction = values + np.random.default_rng(9).normal(size=len(values))
    both = np.stack([values, prediction], axis=1)
    boot = SequenceBootstrap(groups, n_boot=200, seed=1, level=0.9)

    def r2(rows):
        y, p = rows[:, 0], rows[:, 1]
        return 1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    def pearson(rows):
        return np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]

    for score, reference in ((boot.r2(values, prediction), r2), (boot.pearson(values, prediction), pearson)):
        low, high = _brute_force(both, groups, reference, 200, 1, 0.9)
        assert score.value == pytest.approx(reference(both), abs=1e-10)
        assert (score.low, score.high) == pytest.approx((low, high), abs=1e-10)


def test_vector_statistics_and_one_unit():
    moved = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    gap = np.array([2.0, 2.0, 4.0])
    point, low, high = stats.bootstrap_sums(np.divide, moved, gap, n_boot=100)
    assert point == pytest.approx([6 / 8, 1 / 8])
    assert low.shape == (2,) and (low <= point).all() and (point <= high).all()
    # one unit: every resample is that unit
    assert stats.bootstrap_sums(np.divide, np.array([3.0]), np.array([2.0])) == (1.5, 1.5, 1.5)


def test_an_undefined_resample_makes_the_interval_nan_not_a_narrower_one():
    # unit 0 has no tokens: a resample drawing only unit 0 has mean 0/0
    point, low, high = stats.bootstrap_sums(np.divide, np.array([0.0, 2.0]), np.array([0.0, 1.0]), n_boot=200)
    assert point == 2.0 and np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_boot": 0}, "n_boot must be >= 1"), ({"level": 1.0}, "level must be in")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.bootstrap_sums(np.divide, np.ones(3), np.ones(3), **kwargs)


def test_mismatched_units_are_refused(unchecked_shapes):
    with pytest.raises(ValueError, match="number of units"):
        stats.bootstrap_sums(np.divide, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="groups have"):
        stats.bootstrap_mean(np.ones(3), np.zeros(4, int))


def test_zscore():
    assert stats.zscore(5.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(3.0)
    assert np.isnan(stats.zscore(1.0, np.array([0.0])))
