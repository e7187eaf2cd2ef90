"""Sequence-level (grouped) bootstrap confidence intervals: the one bootstrap of the project.

Tokens of one sequence are not independent, so every interval resamples whole units (sequences,
or pairs of runs). Every statistic the project reports is a function of per-unit *sums* (token
counts, sums of entropy, of squared errors, ...), so one function, :func:`bootstrap_sums`,
serves them all: it resamples units with :func:`scipy.stats.bootstrap` (paired, percentile
method) and evaluates the statistic on the column totals of each resample.

Resamples depend only on ``(n_units, n_boot, seed)``: two statistics over the same units and
seed see the same resamples, so curves over hooks or strengths are compared pairwise.

A resample on which the statistic is undefined (NaN, e.g. a ratio with a zero denominator) makes
the interval NaN: the interval is reported as undefined rather than silently computed from the
remaining resamples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.stats
from jaxtyping import Bool, Float, Int

__all__ = [
    "MeanWithCI",
    "Estimate",
    "bootstrap_sums",
    "bootstrap_mean",
    "unit_sums",
    "ratio_with_ci",
    "slope",
    "slope_with_ci",
    "zscore",
    "bootstrap_nested",
    "MIN_RANDOM_DIRECTIONS",
    "MIN_UNITS",
    "small_sample_warnings",
    "permutation_p_text",
]

# Below these, a z-score against random directions / a bootstrap CI over units is too noisy to
# trust: the std of k random controls is itself uncertain by ~1/sqrt(2(k-1)) (k = 10: +/-24%), and
# a percentile bootstrap over fewer than ~10 units undercovers badly.
MIN_RANDOM_DIRECTIONS = 10
MIN_UNITS = 10

# Largest resampled block (elements) held at once: scipy materialises (leading dims, batch, units).
_MAX_BLOCK = 4_000_000


@dataclass(frozen=True)
class MeanWithCI:
    """A mean with a percentile bootstrap confidence interval over independent units."""

    mean: float
    low: float
    high: float
    n_units: int
    n_tokens: int
    level: float = 0.95

    def __str__(self) -> str:
        return (
            f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}] "
            f"({self.level:.0%} CI, {self.n_units} sequences, {self.n_tokens} tokens)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


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


def _scalar(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def bootstrap_sums(
    statistic: Callable[..., np.ndarray],
    *per_unit: Float[np.ndarray, "... n_units"],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
):
    """``(point, low, high)`` of ``statistic(*totals)``, resampling units (the last axis).

    ``per_unit``: one or more arrays whose last axis is the unit (sequence); a resample draws
    units with replacement (the same draw for every array) and passes each array's total over
    the drawn units to ``statistic``, which must work elementwise on leading axes. Scalars come
    back as floats, vector statistics as arrays.

    >>> sums, counts = np.array([2.0, 9.0, 4.0]), np.array([2.0, 3.0, 4.0])
    >>> point, low, high = bootstrap_sums(np.divide, sums, counts, n_boot=200)
    >>> point == 15 / 9, low <= point <= high
    (True, True)
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not per_unit:
        raise ValueError("bootstrap_sums needs at least one per-unit array")
    arrays = [np.asarray(x, dtype=np.float64) for x in per_unit]
    n_units = arrays[0].shape[-1]
    if n_units == 0 or any(x.shape[-1] != n_units for x in arrays):
        raise ValueError(
            f"per-unit arrays need one non-zero number of units on their last axis, got shapes "
            f"{[x.shape for x in arrays]}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        point = statistic(*(x.sum(-1) for x in arrays))
    if n_units == 1:  # every resample is the one unit
        return _scalar(point), _scalar(point), _scalar(point)

    def resampled(*samples, axis):
        with np.errstate(divide="ignore", invalid="ignore"):
            return statistic(*(s.sum(axis) for s in samples))

    width = max(int(np.prod(x.shape[:-1])) for x in arrays) * n_units
    with warnings.catch_warnings():
        # NaN intervals are the documented outcome for undefined resamples, not a surprise.
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap(
            arrays,
            resampled,
            n_resamples=n_boot,
            batch=max(1, min(n_boot, _MAX_BLOCK // width)),
            vectorized=True,
            paired=True,
            axis=-1,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    interval = result.confidence_interval
    return _scalar(point), _scalar(interval.low), _scalar(interval.high)


def unit_sums(
    values: Float[np.ndarray, " n"], units: Int[np.ndarray, " n"]
) -> tuple[np.ndarray, Float[np.ndarray, " n_units"], Float[np.ndarray, " n_units"]]:
    """``(unit_ids, sum of values per unit, token count per unit)``, units sorted.

    >>> unit_sums(np.array([1.0, 2.0, 5.0]), np.array([7, 3, 7]))
    (array([3, 7]), array([2., 6.]), array([1., 2.]))
    """
    unique, inverse = np.unique(np.asarray(units), return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=np.asarray(values, np.float64), minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.float64)
    return unique, sums, counts


def bootstrap_mean(
    values: Float[np.ndarray, " n"],
    groups: Int[np.ndarray, " n"] | None = None,
    *,
    mask: Bool[np.ndarray, " n"] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> MeanWithCI:
    """Token-weighted mean of ``values`` with a CI from resampling whole groups (sequences).

    Non-finite values and values outside ``mask`` are left out.

    >>> ci = bootstrap_mean(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1]))
    >>> ci.mean, ci.n_units, ci.n_tokens
    (2.5, 2, 4)
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    if groups.shape != values.shape:
        raise ValueError(f"values have shape {values.shape} but groups have {groups.shape}")
    keep = np.isfinite(values) if mask is None else (np.asarray(mask, bool) & np.isfinite(values))
    values, groups = values[keep], groups[keep]
    if len(values) == 0:
        raise ValueError("bootstrap_mean got no finite values inside the mask")
    unique, sums, counts = unit_sums(values, groups)
    _, low, high = bootstrap_sums(np.divide, sums, counts, n_boot=n_boot, level=level, seed=seed)
    return MeanWithCI(
        mean=float(values.mean()),
        low=low,
        high=high,
        n_units=len(unique),
        n_tokens=len(values),
        level=level,
    )


def ratio_with_ci(
    sums: Float[np.ndarray, " n_units"],
    counts: Float[np.ndarray, " n_units"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Token-weighted mean ``sum(sums) / sum(counts)`` with a CI from resampling units.

    >>> ratio_with_ci(np.array([1.0, 3.0]), np.array([1.0, 1.0]), n_boot=100).value
    2.0
    """
    point, low, high = bootstrap_sums(np.divide, sums, counts, n_boot=n_boot, level=level, seed=seed)
    return Estimate(point, low, high, level)


def slope(
    x: Float[np.ndarray, " n"] | Sequence[float], y: Float[np.ndarray, "*batch n"]
) -> Float[np.ndarray, "*batch"] | float:
    """Least-squares slope of ``y`` on ``x`` along the last axis.

    >>> float(slope(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0])))
    2.0
    """
    x = np.asarray(x, np.float64)
    centred = x - x.mean()
    y = np.asarray(y, np.float64)
    return (y - y.mean(-1, keepdims=True)) @ centred / (centred @ centred)


def slope_with_ci(
    x: Float[np.ndarray, " n_x"],
    sums: Float[np.ndarray, "n_x n_units"],
    counts: Float[np.ndarray, " n_units"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Slope over ``x`` of the token-weighted means ``sums[i].sum() / counts.sum()``, with a CI
    from resampling units (each resample keeps a unit's values at every ``x`` together).

    >>> counts = np.array([2.0, 2.0, 2.0])
    >>> sums = np.outer([1.0, 2.0, 3.0], counts)          # mean 1, 2, 3 at x = 0, 1, 2
    >>> slope_with_ci(np.array([0.0, 1.0, 2.0]), sums, counts, n_boot=50).value
    1.0
    """
    x = np.asarray(x, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"a slope needs at least two distinct x values, got {x.tolist()}")

    def statistic(total, count):
        return slope(x, np.moveaxis(total / count, 0, -1))

    point, low, high = bootstrap_sums(statistic, sums, counts, n_boot=n_boot, level=level, seed=seed)
    return Estimate(point, low, high, level)


def zscore(value: float, controls: Float[np.ndarray, " k"]) -> float:
    """``(value - mean(controls)) / std(controls, ddof=1)``; NaN with fewer than 2 controls.

    >>> zscore(5.0, np.array([0.0, 2.0, 4.0]))
    1.5
    """
    controls = np.asarray(controls, np.float64)
    if len(controls) < 2:
        return float("nan")
    spread = controls.std(ddof=1)
    if spread == 0:
        return float("inf") * np.sign(value - controls.mean()) if value != controls.mean() else 0.0
    return float((value - controls.mean()) / spread)


def small_sample_warnings(
    *, random_directions: int | None = None, units: int | None = None, unit_name: str = "sequences"
) -> list[str]:
    """One line per sample too small to trust, saying how many are needed (empty when fine).

    >>> small_sample_warnings(random_directions=2, units=12, unit_name="pairs")
    ['z from 2 random directions: its spread is too uncertain to trust; use at least 10']
    >>> small_sample_warnings(random_directions=10, units=3, unit_name="pairs")
    ['CIs from 3 pairs: the bootstrap over so few is unreliable; use at least 10']
    >>> small_sample_warnings(units=1)
    ['CIs from 1 sequence: a bootstrap over one unit has no spread, so each interval is only the point itself; use at least 10']
    """
    lines = []
    if random_directions is not None and 0 < random_directions < MIN_RANDOM_DIRECTIONS:
        lines.append(f"z from {random_directions} random direction{'s' * (random_directions != 1)}: its spread "
                     f"is too uncertain to trust; use at least {MIN_RANDOM_DIRECTIONS}")
    if units is not None and units < 2:
        lines.append(f"CIs from {units} {unit_name.removesuffix('s')}: a bootstrap over one unit has no spread, so "
                     f"each interval is only the point itself; use at least {MIN_UNITS}")
    elif units is not None and units < MIN_UNITS:
        lines.append(f"CIs from {units} {unit_name}: the bootstrap over so few is unreliable; "
                     f"use at least {MIN_UNITS}")
    return lines


def permutation_p_text(p: float, n_permutations: int) -> str:
    """A permutation p-value as text; at its floor ``1 / (1 + n)`` it is a bound, and says so.

    >>> permutation_p_text(1 / 21, 20), permutation_p_text(4 / 21, 20)
    ('<= 0.048 (the floor for 20 shuffles)', '0.190')
    """
    if not n_permutations or p != p:
        return "n/a (no shuffles)"
    floor = 1.0 / (1 + n_permutations)
    if p <= floor * (1 + 1e-9):
        return f"<= {floor:.3f} (the floor for {n_permutations} shuffles)"
    return f"{p:.3f}"


def bootstrap_nested(
    statistic: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[np.ndarray],
    groups: Int[np.ndarray, " n_units"] | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, np.ndarray]:
    """Mean over units of ``statistic(samples of the unit)`` with a two-level bootstrap interval.

    For statistics that are not functions of per-unit sums (an entropy of sampled labels, a modal
    share), so :func:`bootstrap_sums` cannot resample them. Each replicate draws groups of units
    with replacement (``groups``: e.g. the prompt of each phrasing; default: each unit alone) and,
    inside every drawn unit, its samples with replacement. ``statistic`` maps an array
    ``(n_resamples, n_samples_of_the_unit)`` to ``(n_resamples,)``. Each unit's replicates are
    centred on its point value (bias-corrected), since resampling samples with replacement biases a
    plug-in entropy low. Returns ``(point, low, high, per-unit point values)``.

    >>> spread = lambda draws: draws.std(axis=-1)
    >>> point, low, high, per_unit = bootstrap_nested(spread, [np.array([0.0, 2.0]), np.array([1.0, 1.0])])
    >>> point, per_unit.tolist(), low <= point
    (0.5, [1.0, 0.0], True)
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    units = [np.asarray(x) for x in samples]
    if not units or any(len(x) == 0 for x in units):
        raise ValueError("bootstrap_nested needs at least one unit, each with at least one sample")
    groups = np.arange(len(units)) if groups is None else np.asarray(groups)
    if len(groups) != len(units):
        raise ValueError(f"groups has {len(groups)} entries for {len(units)} units")
    rng = np.random.default_rng(seed)
    per_unit = np.array([float(np.asarray(statistic(x[None]))[0]) for x in units])
    boot_units = np.empty((n_boot, len(units)))
    for u, x in enumerate(units):
        boot_units[:, u] = statistic(x[rng.integers(0, len(x), size=(n_boot, len(x)))])
    # Resampling a unit's samples biases statistics such as a plug-in entropy (repeats lower it), so
    # each unit's replicates are shifted by their bias (replicate mean - point value); the spread
    # is kept. For means the shift is ~0.
    boot_units -= boot_units.mean(0) - per_unit
    unique, inverse = np.unique(groups, return_inverse=True)
    drawn = rng.integers(0, len(unique), size=(n_boot, len(unique)))
    weight = np.zeros((n_boot, len(unique)))
    np.add.at(weight, (np.repeat(np.arange(n_boot), len(unique)), drawn.reshape(-1)), 1.0)
    unit_weight = weight[:, inverse.reshape(-1)]
    boot = (unit_weight * boot_units).sum(1) / unit_weight.sum(1)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return float(per_unit.mean()), float(low), float(high), per_unit
