"""Held-out scores (R^2, Pearson r) with confidence intervals from a bootstrap over sequences.

Tokens of one sequence are not independent, so every interval resamples whole sequences, with
the project's one bootstrap (:mod:`surprise_probe.core.utils.stats`). ``Estimate`` is re-exported from there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jaxtyping import Float, Int

from surprise_probe.core.utils.stats import Estimate, bootstrap_sums

__all__ = ["Estimate", "SequenceBootstrap", "r2_from_sums", "pearson_from_sums"]


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
