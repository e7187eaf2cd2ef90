"""Statistics for intervention results, kept apart from models: ratios of sums over sequences,
slopes, bootstrap CIs that resample whole sequences, and z-scores against control directions."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

__all__ = ["ratio_with_ci", "slope", "slope_with_ci", "zscore", "bootstrap_draws"]


def bootstrap_draws(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_units)`` indices of units (sequences) drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_units, size=(n_boot, n_units))


def _quantiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    return float(np.nanquantile(samples, tail)), float(np.nanquantile(samples, 1 - tail))


def ratio_with_ci(
    sums: Float[np.ndarray, " n_seq"],
    counts: Float[np.ndarray, " n_seq"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Token-weighted mean ``sum(sums) / sum(counts)`` with a CI from resampling sequences."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    draws = bootstrap_draws(len(sums), n_boot, seed)
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    return (float(sums.sum() / counts.sum()), *_quantiles(boot, level))


def slope(x: Float[np.ndarray, " n"], y: Float[np.ndarray, "... n"]) -> Float[np.ndarray, "..."]:
    """Least-squares slope of ``y`` on ``x`` along the last axis."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean()
    y = np.asarray(y, np.float64)
    return (y - y.mean(-1, keepdims=True)) @ centred / (centred @ centred)


def slope_with_ci(
    alphas: Float[np.ndarray, " n_alpha"],
    sums: Float[np.ndarray, "n_alpha n_seq"],
    counts: Float[np.ndarray, " n_seq"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Slope of the token-weighted mean over sequences vs alpha, with a sequence-bootstrap CI."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    if len(alphas) < 2 or np.ptp(alphas) == 0:
        raise ValueError(f"a slope needs at least two distinct alphas, got {list(alphas)}")
    point = float(slope(alphas, sums.sum(1) / counts.sum()))
    draws = bootstrap_draws(sums.shape[1], n_boot, seed)
    boot_means = sums[:, draws].sum(-1) / counts[draws].sum(-1)  # (n_alpha, n_boot)
    boot = slope(alphas, boot_means.T)
    return (point, *_quantiles(boot, level))


def zscore(value: float, controls: Float[np.ndarray, " k"]) -> float:
    """``(value - mean(controls)) / std(controls, ddof=1)``; NaN with fewer than 2 controls."""
    controls = np.asarray(controls, np.float64)
    if len(controls) < 2:
        return float("nan")
    spread = controls.std(ddof=1)
    if spread == 0:
        return float("inf") * np.sign(value - controls.mean()) if value != controls.mean() else 0.0
    return float((value - controls.mean()) / spread)
