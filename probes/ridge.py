"""Ridge regression from streamed sufficient statistics, and a scikit-learn style estimator.

:class:`RidgeStats` accumulates ``n``, ``sum x``, ``sum y``, ``X^T X``, ``X^T Y`` and ``sum y^2`` in
float64, chunk by chunk, so a probe never needs all activations in memory. Statistics add and
subtract, so the training statistics of a CV fold are ``total - fold``. :func:`solve_ridge`
centres (and by default standardises) the features with the training statistics only, takes one
eigendecomposition of the centred Gram matrix, and returns the solution for every ``alpha`` and
every target column at the cost of a matrix product each. :func:`heldout_sums` scores a solution
on other statistics exactly (the squared error is a quadratic form in ``X^T X``).

The penalty is scikit-learn's: minimise ``||y - Zw - b||^2 + alpha ||w||^2`` with ``Z`` the
standardised features (or raw features with ``standardize=False``), ``b`` unpenalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
from jaxtyping import Float
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["RidgeStats", "RidgeSolution", "solve_ridge", "heldout_sums", "RidgeProbe"]


class RidgeStats:
    """Float64 sufficient statistics of features ``X`` and target columns ``Y``.

    ``shift_x`` / ``shift_y`` are subtracted before accumulating (any value close to the data mean)
    so that the sums stay small and centring loses no precision; statistics that are added or
    subtracted must share their shifts.

    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(100, 3)), rng.normal(size=100)
    >>> stats = RidgeStats(3)
    >>> for rows in np.array_split(np.arange(100), 4):
    ...     _ = stats.update(X[rows], y[rows])
    >>> stats.n, np.allclose(stats.xtx, X.T @ X)
    (100, True)
    """

    def __init__(
        self,
        n_features: int,
        n_targets: int = 1,
        shift_x: Float[np.ndarray, " d"] | Sequence[float] | None = None,
        shift_y: Float[np.ndarray, " t"] | Sequence[float] | None = None,
    ):
        self.n_features, self.n_targets = int(n_features), int(n_targets)
        self.shift_x = (
            np.zeros(n_features) if shift_x is None else np.asarray(shift_x, np.float64).copy()
        )
        self.shift_y = (
            np.zeros(n_targets) if shift_y is None else np.asarray(shift_y, np.float64).copy()
        )
        if self.shift_x.shape != (n_features,) or self.shift_y.shape != (n_targets,):
            raise ValueError(
                f"shifts must have shapes ({n_features},) and ({n_targets},), "
                f"got {self.shift_x.shape} and {self.shift_y.shape}"
            )
        self.n = 0
        self.sum_x = np.zeros(n_features)
        self.sum_y = np.zeros(n_targets)
        self.xtx = np.zeros((n_features, n_features))
        self.xty = np.zeros((n_features, n_targets))
        self.yty = np.zeros(n_targets)  # per-column sum of squares (the diagonal of Y^T Y)

    def update(self, X: Float[np.ndarray, "n d"], Y: Float[np.ndarray, "n ..."]) -> RidgeStats:
        """Add a chunk of rows (shifted in float64)."""
        X = np.asarray(X, dtype=np.float64) - self.shift_x
        Y = np.asarray(Y, dtype=np.float64).reshape(len(X), -1) - self.shift_y
        if X.ndim != 2 or X.shape[1] != self.n_features or Y.shape[1] != self.n_targets:
            raise ValueError(
                f"expected X (n, {self.n_features}) and Y (n, {self.n_targets}), got {X.shape} and {Y.shape}"
            )
        self.n += len(X)
        self.sum_x += X.sum(0)
        self.sum_y += Y.sum(0)
        self.xtx += X.T @ X
        self.xty += X.T @ Y
        self.yty += np.einsum("nt,nt->t", Y, Y)
        return self

    def _combine(self, other: RidgeStats, sign: int) -> RidgeStats:
        if not (
            np.array_equal(self.shift_x, other.shift_x)
            and np.array_equal(self.shift_y, other.shift_y)
        ):
            raise ValueError("RidgeStats with different shifts cannot be combined")
        out = RidgeStats(self.n_features, self.n_targets, self.shift_x, self.shift_y)
        out.n = self.n + sign * other.n
        for name in ("sum_x", "sum_y", "xtx", "xty", "yty"):
            setattr(out, name, getattr(self, name) + sign * getattr(other, name))
        return out

    def __add__(self, other: RidgeStats) -> RidgeStats:
        return self._combine(other, +1)

    def __sub__(self, other: RidgeStats) -> RidgeStats:
        return self._combine(other, -1)

    @property
    def mean_x(self) -> Float[np.ndarray, " d"]:
        return self.sum_x / self.n + self.shift_x

    def centered_gram(self) -> Float[np.ndarray, "d d"]:
        """``sum (x - mean)(x - mean)^T``."""
        mu = self.sum_x / self.n
        return self.xtx - self.n * np.outer(mu, mu)


@dataclass
class RidgeSolution:
    """Ridge fits for a grid of ``alphas`` and several target columns, in activation space.

    ``prediction = x @ coef[a, t] + intercept[a, t]`` for raw (unshifted, unstandardised) ``x``.
    """

    alphas: Float[np.ndarray, " a"]
    coef: Float[np.ndarray, "a t d"]
    intercept: Float[np.ndarray, "a t"]
    feature_mean: Float[np.ndarray, " d"]
    feature_scale: Float[np.ndarray, " d"]
    n_train: int


def _feature_scale(variance: Float[np.ndarray, " d"]) -> Float[np.ndarray, " d"]:
    # Like sklearn's StandardScaler: a (numerically) constant feature keeps scale 1.
    scale = np.sqrt(np.maximum(variance, 0.0))
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(scale).max())] = 1.0
    return scale


def solve_ridge(stats: RidgeStats, alphas, standardize: bool = True) -> RidgeSolution:
    """Ridge solutions for every alpha and target column from one eigendecomposition."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if np.any(~np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"ridge alphas must be finite and > 0, got {alphas.tolist()}")
    if stats.n < 2:
        raise ValueError(f"ridge needs at least 2 training rows, got n_samples={stats.n}")
    n = stats.n
    mu = stats.sum_x / n
    ybar = stats.sum_y / n
    gram = stats.centered_gram()
    cross = stats.xty - n * np.outer(mu, ybar)
    scale = _feature_scale(np.diag(gram) / n) if standardize else np.ones(stats.n_features)
    gram = gram / np.outer(scale, scale)
    cross = cross / scale[:, None]
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.maximum(eigvals, 0.0)
    rotated = eigvecs.T @ cross  # (d, t)
    shrunk = rotated[None, :, :] / (eigvals[None, :, None] + alphas[:, None, None])  # (a, d, t)
    weights = einops.einsum(eigvecs, shrunk, "d e, a e t -> a t d")  # back from the eigenbasis
    coef = weights / scale  # back to activation space
    # shifted coordinates: y - sy = (x - sx) @ coef + ybar - mu @ coef
    intercept = ybar[None, :] - coef @ mu + stats.shift_y[None, :] - coef @ stats.shift_x
    return RidgeSolution(alphas, coef, intercept, mu + stats.shift_x, scale, n)


def heldout_sums(stats: RidgeStats, solution: RidgeSolution) -> dict[str, Float[np.ndarray, "a t"]]:
    """Exact sums over the rows behind ``stats`` of the predictions of every fit in ``solution``.

    Returns ``n, sse, sum_y, sum_yy, sum_p, sum_pp, sum_py`` (in the shifted target coordinates of
    ``stats``; squared error and correlations do not depend on the shift).
    """
    coef = solution.coef
    # intercept in the shifted coordinates of `stats`
    c = solution.intercept + coef @ stats.shift_x - stats.shift_y[None, :]
    quad = np.einsum("atd,atd->at", coef @ stats.xtx, coef)
    lin_x = coef @ stats.sum_x
    lin_xy = np.einsum("atd,dt->at", coef, stats.xty)
    n = stats.n
    sum_p = lin_x + n * c
    sum_pp = quad + 2 * c * lin_x + n * c**2
    sum_py = lin_xy + c * stats.sum_y[None, :]
    sum_y = np.broadcast_to(stats.sum_y, c.shape)
    sum_yy = np.broadcast_to(stats.yty, c.shape)
    return {
        "n": np.full(c.shape, float(n)),
        "sse": sum_yy - 2 * sum_py + sum_pp,
        "sum_y": sum_y,
        "sum_yy": sum_yy,
        "sum_p": sum_p,
        "sum_pp": sum_pp,
        "sum_py": sum_py,
    }


class RidgeProbe(RegressorMixin, BaseEstimator):
    """A ridge probe for one hook, with the scikit-learn estimator contract.

    Features are standardised with the training rows' mean and (population) std, the target is
    centred, and ``alpha`` penalises the standardised weights, so ``alpha`` means the same at every
    layer whatever the activation scale. ``coef_`` and ``intercept_`` act on raw activations.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 8)); y = X @ np.arange(8.0) + rng.normal(size=200)
    >>> probe = RidgeProbe(alpha=1.0).fit(X, y)
    >>> round(probe.score(X, y), 2)
    0.99
    """

    # No annotations or checks here (the scikit-learn contract: __init__ stores, fit validates).
    def __init__(self, alpha=1.0, standardize=True):
        self.alpha = alpha
        self.standardize = standardize

    # X, y: array-likes (the scikit-learn contract: lists, other dtypes, pandas), validated by
    # validate_data, so they carry no ndarray annotation.
    def fit(self, X, y) -> RidgeProbe:
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        # Shift by the data mean: exact centring, so no precision is lost in X^T X.
        stats = RidgeStats(X.shape[1], 1, shift_x=X.mean(0), shift_y=np.array([y.mean()]))
        stats.update(X, y)
        solution = solve_ridge(stats, [self.alpha], standardize=self.standardize)
        self.coef_ = solution.coef[0, 0]
        self.intercept_ = float(solution.intercept[0, 0])
        self.mean_ = solution.feature_mean
        self.scale_ = solution.feature_scale
        return self

    def predict(self, X) -> Float[np.ndarray, " n"]:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_ + self.intercept_

    @property
    def direction_(self) -> Float[np.ndarray, " d"]:
        """Unit vector in activation space along which the prediction grows (``coef_`` / its norm).

        >>> probe = RidgeProbe(alpha=1e-6).fit(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0.0, 3.0, 4.0]))
        >>> np.round(probe.direction_, 3).tolist()
        [0.6, 0.8]
        """
        check_is_fitted(self, "coef_")
        return self.coef_ / np.linalg.norm(self.coef_)
