"""Held-out scores with confidence intervals from a bootstrap over sequences.

Tokens of one sequence are not independent, so every interval resamples whole sequences. One
:class:`SequenceBootstrap` draws its resamples once and reuses them for every score, so curves
over hooks are compared on the same resamples (paired).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from jaxtyping import Float, Int

__all__ = ["Estimate", "SequenceBootstrap", "r2_from_sums", "pearson_from_sums"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def to_dict(self) -> dict:
        return asdict(self)


def r2_from_sums(n, sum_y, sum_yy, sse):
    """``1 - SSE / SST`` with ``SST`` around the mean of the scored targets."""
    sst = sum_yy - sum_y**2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - sse / sst


def pearson_from_sums(n, sum_a, sum_aa, sum_b, sum_bb, sum_ab):
    cov = sum_ab - sum_a * sum_b / n
    var_a = sum_aa - sum_a**2 / n
    var_b = sum_bb - sum_b**2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return cov / np.sqrt(var_a * var_b)


class SequenceBootstrap:
    """Resamples of whole sequences, drawn once.

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
        n_seq = len(self.unique)
        draws = np.random.default_rng(seed).integers(0, n_seq, size=(n_boot, n_seq))
        # how many times each sequence is drawn, per resample
        self.weights = np.zeros((n_boot, n_seq))
        np.add.at(self.weights, (np.repeat(np.arange(n_boot), n_seq), draws.reshape(-1)), 1.0)
        self.level = level

    def _sums(self, columns: Float[np.ndarray, "n k"]) -> tuple[np.ndarray, np.ndarray]:
        per_sequence = np.stack(
            [np.bincount(self.inverse, weights=c, minlength=len(self.unique)) for c in columns.T],
            axis=1,
        )
        return per_sequence.sum(0), self.weights @ per_sequence

    def _estimate(self, point: float, boot: np.ndarray) -> Estimate:
        boot = boot[np.isfinite(boot)]
        tail = (1 - self.level) / 2
        low, high = np.quantile(boot, [tail, 1 - tail]) if len(boot) else (np.nan, np.nan)
        return Estimate(float(point), float(low), float(high), self.level)

    def r2(self, y: Float[np.ndarray, " n"], prediction: Float[np.ndarray, " n"]) -> Estimate:
        """Held-out ``R^2 = 1 - SSE/SST`` pooled over all tokens, CI over sequences."""
        y = np.asarray(y, np.float64)
        centre = y.mean()
        yc, pc = y - centre, np.asarray(prediction, np.float64) - centre
        cols = np.stack([np.ones_like(yc), yc, yc**2, (yc - pc) ** 2], axis=1)
        point, boot = self._sums(cols)
        return self._estimate(r2_from_sums(*point), r2_from_sums(*boot.T))

    def pearson(self, a: Float[np.ndarray, " n"], b: Float[np.ndarray, " n"]) -> Estimate:
        """Pearson correlation over all tokens, CI over sequences."""
        a = np.asarray(a, np.float64) - np.mean(a)
        b = np.asarray(b, np.float64) - np.mean(b)
        cols = np.stack([np.ones_like(a), a, a**2, b, b**2, a * b], axis=1)
        point, boot = self._sums(cols)
        return self._estimate(pearson_from_sums(*point), pearson_from_sums(*boot.T))
