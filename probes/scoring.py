"""Held-out scores (R^2, Pearson r) with confidence intervals from a bootstrap over sequences.

Tokens of one sequence are not independent, so every interval resamples whole sequences, with
the project's one bootstrap (:mod:`surprise_probe.core.utils.stats`). ``Estimate`` is re-exported from there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jaxtyping import Float, Int

from surprise_probe.core.utils.stats import Estimate, bootstrap_sums

__all__ = ["Estimate", "SequenceBootstrap", "r2_from_sums", "pearson_from_sums", "probe_caveats"]


def r2_from_sums(n, sum_y, sum_yy, sse):
    """``1 - SSE / SST`` with ``SST`` around the mean of the scored targets.

    >>> y, pred = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])
    >>> float(r2_from_sums(3, y.sum(), (y ** 2).sum(), ((y - pred) ** 2).sum()))
    0.5
    """
    sst = sum_yy - sum_y**2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - sse / sst


def pearson_from_sums(n, sum_a, sum_aa, sum_b, sum_bb, sum_ab):
    """Pearson r from sums, so bootstrap resamples need only per-sequence sums.

    >>> a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])
    >>> round(float(pearson_from_sums(3, a.sum(), (a * a).sum(), b.sum(), (b * b).sum(), (a * b).sum())), 4)
    0.9934
    """
    cov = sum_ab - sum_a * sum_b / n
    var_a = sum_aa - sum_a**2 / n
    var_b = sum_bb - sum_b**2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return cov / np.sqrt(var_a * var_b)


class SequenceBootstrap:
    """Scores with CIs from resampling whole sequences (:func:`surprise_probe.core.utils.stats.bootstrap_sums`).

    Resamples depend only on the number of sequences, ``n_boot`` and ``seed``, so every score
    from one instance (every hook, every control) sees the same resamples (paired).

    >>> boot = SequenceBootstrap(np.repeat(np.arange(20), 5), n_boot=200, seed=0)
    >>> y = np.random.default_rng(0).normal(size=100)
    >>> boot.r2(y, y).value, boot.pearson(y, 2 * y).value
    (1.0, 1.0)
    """

    def __init__(
        self,
        sequence_ids: Int[np.ndarray, " n"],
        n_boot: int = 1000,
        seed: int = 0,
        level: float = 0.95,
    ):
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        self.unique, self.inverse = np.unique(np.asarray(sequence_ids), return_inverse=True)
        self.inverse = self.inverse.reshape(-1)
        self.n_boot, self.seed, self.level = n_boot, seed, level

    def per_sequence(self, columns: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "k n_seq"]:
        """Per-sequence sums of each token column."""
        return np.stack(
            [np.bincount(self.inverse, weights=c, minlength=len(self.unique)) for c in columns.T]
        )

    def estimate(self, statistic: Callable[..., np.ndarray], columns: Float[np.ndarray, "n k"]) -> Estimate:
        """``statistic(*column_totals)`` over all tokens, with a CI over sequences."""
        point, low, high = bootstrap_sums(
            statistic, *self.per_sequence(columns), n_boot=self.n_boot, level=self.level, seed=self.seed
        )
        return Estimate(point, low, high, self.level)

    def r2(self, y: Float[np.ndarray, " n"], prediction: Float[np.ndarray, " n"]) -> Estimate:
        """Held-out ``R^2 = 1 - SSE/SST`` pooled over all tokens, CI over sequences."""
        y = np.asarray(y, np.float64)
        centre = y.mean()
        yc, pc = y - centre, np.asarray(prediction, np.float64) - centre
        return self.estimate(r2_from_sums, np.stack([np.ones_like(yc), yc, yc**2, (yc - pc) ** 2], axis=1))

    def pearson(self, a: Float[np.ndarray, " n"], b: Float[np.ndarray, " n"]) -> Estimate:
        """Pearson correlation over all tokens, CI over sequences."""
        a = np.asarray(a, np.float64) - np.mean(a)
        b = np.asarray(b, np.float64) - np.mean(b)
        columns = np.stack([np.ones_like(a), a, a**2, b, b**2, a * b], axis=1)
        return self.estimate(pearson_from_sums, columns)


# A probe counts as better than its shuffled-label control when its permutation p is below this.
SHUFFLE_LEVEL = 0.05


def probe_caveats(metrics: dict, hook: str = "the probe") -> list[str]:
    """Why a fitted probe may not be worth steering with, read from its recorded metrics.

    Rules (each a line when it fails): the held-out R² CI excludes 0; the permutation p against
    shuffled labels is below 0.05 (with at least 20 shuffles, the smallest count whose floor can
    reach it); the R² of the target minus its token-type mean (``residual_r2``, the token-identity
    control) has a CI above 0. ``metrics`` is ``ProbeDirection.metrics`` (or the same keys).

    >>> probe_caveats({"r2": {"value": 0.07, "low": -0.004, "high": 0.13}, "shuffle_p": 0.167,
    ...                "residual_r2": {"value": 0.01, "low": -0.02, "high": 0.04}}, "blocks.3.hook_resid_post")[0]
    'blocks.3.hook_resid_post: held-out R^2 0.070 [-0.004, 0.130] does not exclude 0'
    """
    notes = []
    r2, residual = metrics.get("r2") or {}, metrics.get("residual_r2") or {}
    if r2 and not (r2.get("low") is not None and r2["low"] > 0):
        notes.append(f"{hook}: held-out R^2 {r2.get('value', float('nan')):.3f} "
                     f"[{r2.get('low', float('nan')):.3f}, {r2.get('high', float('nan')):.3f}] does not exclude 0")
    p = metrics.get("shuffle_p")
    if p is not None and p == p and p >= SHUFFLE_LEVEL:
        notes.append(f"{hook}: not better than its shuffled-label control (permutation p {p:.3f} >= {SHUFFLE_LEVEL}; "
                     "at least 20 shuffles are needed to reach p < 0.05)")
    if residual and not (residual.get("low") is not None and residual["low"] > 0):
        notes.append(f"{hook}: not beyond the token-identity control (R^2 of the target minus its token-type mean "
                     f"{residual.get('value', float('nan')):.3f}, CI low {residual.get('low', float('nan')):.3f})")
    return notes
