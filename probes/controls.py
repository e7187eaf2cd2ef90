"""Controls for probe results that need no activations, each learned on the training folds only.

Each control is a *fitter*: a function from a boolean mask of training tokens to predictions for
every token. :func:`fold_predictions` turns one into an ``(n, k)`` array whose column ``f`` is
the control fitted on the tokens outside fold ``f`` (the out-of-fold prediction of token ``i`` is
``result[i, folds[i]]``); :func:`cross_fitted_predictions` gives the residual targets a probe is
trained on (the control's prediction for each training token from data without that token's fold).
The ``*_predictions`` functions are :func:`fold_predictions` of each fitter.

- :func:`token_mean_predictions`: mean target per token type (unigram); unseen types back off to
  the training mean.
- :func:`bigram_mean_predictions`: mean target per (previous token, current token) pair; unseen
  pairs back off to the unigram prediction, and that to the training mean.
- :func:`position_predictions`: ridge on one-hot bins of the position in the sequence and of the
  position in the scored span (an additive step function of both).
- :func:`covariate_predictions`: ridge on a covariate (e.g. another model's surprise) and one-hot
  bins of its training quantiles (linear plus step function), for "the target beyond the covariate".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jaxtyping import Bool, Float, Int
from surprise_probe.probes.ridge import RidgeStats, solve_ridge

__all__ = [
    "Fitter",
    "token_mean_fitter",
    "bigram_mean_fitter",
    "position_fitter",
    "covariate_fitter",
    "fold_predictions",
    "cross_fitted_predictions",
    "token_mean_predictions",
    "bigram_mean_predictions",
    "position_predictions",
    "position_features",
    "covariate_predictions",
    "span_positions",
    "previous_token_ids",
    "POSITION_EDGES",
]

# One bin per position up to 16 (where surprise changes fastest), then roughly geometric bins.
POSITION_EDGES = np.array(
    [*range(17), 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
     448, 512, 640, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 32768],
    dtype=np.int64,
)
_CONTROL_ALPHA = 1e-3  # ridge penalty of the position/covariate controls: resolves the collinear one-hot sets, shrinks almost nothing


Fitter = Callable[[Bool[np.ndarray, " n"]], Float[np.ndarray, " n"]]


def _group_mean_fitter(groups: Int[np.ndarray, " n"], y: Float[np.ndarray, " n"], fallback: Fitter) -> Fitter:
    """Mean of ``y`` per group on the training rows; groups unseen there take ``fallback``."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0

    def fit(train):
        sums = np.bincount(groups[train], weights=y[train], minlength=n_groups)
        counts = np.bincount(groups[train], minlength=n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        return np.where(counts[groups] > 0, means[groups], fallback(train))

    return fit


def _global_mean_fitter(y: Float[np.ndarray, " n"]) -> Fitter:
    return lambda train: np.full(len(y), y[train].mean())


def token_mean_fitter(token_ids: Int[np.ndarray, " n"], y: Float[np.ndarray, " n"]) -> Fitter:
    """Mean target per token type on the training rows (unseen types: the training mean).

    Returns ``fit(train_mask) -> predictions for every row``.

    >>> fit = token_mean_fitter(np.array([7, 7, 8, 9]), np.array([1.0, 3.0, 5.0, 10.0]))
    >>> fit(np.array([True, True, True, False])).tolist()  # token 9 unseen in training: the mean
    [2.0, 2.0, 5.0, 3.0]
    """
    _, groups = np.unique(token_ids, return_inverse=True)
    return _group_mean_fitter(groups.reshape(-1), np.asarray(y, np.float64), _global_mean_fitter(y))


def bigram_mean_fitter(
    previous_ids: Int[np.ndarray, " n"], token_ids: Int[np.ndarray, " n"], y: Float[np.ndarray, " n"]
) -> Fitter:
    """Mean target per (previous, current) token pair; unseen pairs: the token-type mean, then the training mean.

    >>> fit = bigram_mean_fitter(np.array([1, 2, 1, 2]), np.array([5, 5, 5, 5]), np.array([0.0, 4.0, 2.0, 9.0]))
    >>> fit(np.array([True, True, True, False])).tolist()  # (2, 5) seen once in training
    [1.0, 4.0, 1.0, 4.0]
    """
    pairs = np.stack([np.asarray(previous_ids, np.int64), np.asarray(token_ids, np.int64)], axis=1)
    _, groups = np.unique(pairs, axis=0, return_inverse=True)
    return _group_mean_fitter(groups.reshape(-1), np.asarray(y, np.float64), token_mean_fitter(token_ids, y))


def _ridge_fitter(features_for, y: Float[np.ndarray, " n"]) -> Fitter:
    """Ridge (raw features, unpenalised intercept) fitted on the training rows; ``features_for(train)``."""
    y = np.asarray(y, np.float64)

    def fit(train):
        features = features_for(train)
        stats = RidgeStats(
            features.shape[1], 1, shift_x=features[train].mean(0), shift_y=np.array([y[train].mean()])
        ).update(features[train], y[train])
        solution = solve_ridge(stats, [_CONTROL_ALPHA], standardize=False)
        return features @ solution.coef[0, 0] + solution.intercept[0, 0]

    return fit


def position_fitter(
    positions: Int[np.ndarray, " n"], span_positions: Int[np.ndarray, " n"], y: Float[np.ndarray, " n"]
) -> Fitter:
    """Ridge (alpha 1e-3) on :func:`position_features`: about the mean target per position bin."""
    features = position_features(positions, span_positions)
    return _ridge_fitter(lambda train: features, y)


def covariate_fitter(covariate: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"], n_bins: int = 20) -> Fitter:
    """Ridge on the covariate and one-hot bins at its training quantiles (linear plus step function)."""
    covariate = np.asarray(covariate, np.float64)

    def features(train):
        edges = np.unique(np.quantile(covariate[train], np.linspace(0, 1, n_bins + 1)[:-1]))
        bins = np.clip(np.searchsorted(edges, covariate, side="right") - 1, 0, len(edges) - 1)
        one_hot = np.zeros((len(covariate), len(edges)))
        one_hot[np.arange(len(covariate)), bins] = 1.0
        return np.concatenate([covariate[:, None], one_hot], axis=1)

    return _ridge_fitter(features, y)


def fold_predictions(fit: Fitter, folds: Int[np.ndarray, " n"], n_folds: int) -> Float[np.ndarray, "n k"]:
    """Column ``f``: the control fitted on the tokens outside fold ``f``, predicting every token.

    >>> fit = token_mean_fitter(np.array([1, 1, 1, 1]), np.array([1.0, 2.0, 3.0, 4.0]))
    >>> fold_predictions(fit, np.array([0, 0, 1, 1]), 2)[:, 0].tolist()  # fitted on fold 1 only
    [3.5, 3.5, 3.5, 3.5]
    """
    return np.stack([fit(folds != fold) for fold in range(n_folds)], axis=1)


def cross_fitted_predictions(fit: Fitter, folds: Int[np.ndarray, " n"], n_folds: int) -> Float[np.ndarray, "n k"]:
    """Column ``f``: each token's control prediction from data that excludes fold ``f`` and its own fold.

    On fold ``f`` this is :func:`fold_predictions` (the held-out prediction); on another fold
    ``g`` it comes from the control fitted outside folds ``f`` and ``g``. So the residual targets
    a probe is trained on (column ``f`` on the training folds) are residuals on data the control
    did not see, like the residuals it is scored on, instead of in-sample residuals (which are
    exactly 0 for a pair or type seen once). Needs ``n_folds >= 3``; with 2 folds the training
    residuals are in-sample.
    """
    out = fold_predictions(fit, folds, n_folds)
    if n_folds < 3:
        return out
    for f in range(n_folds):
        for g in range(n_folds):
            if g != f:
                rows = folds == g
                out[rows, f] = fit((folds != f) & (folds != g))[rows]
    return out


def token_mean_predictions(
    token_ids: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: mean target of each token type over the tokens outside fold ``f``.

    Token types never seen outside fold ``f`` back off to the mean target outside fold ``f``.
    The out-of-fold prediction of token ``i`` is ``result[i, folds[i]]``.

    >>> y = np.array([1.0, 3.0, 5.0, 7.0]); folds = np.array([0, 1, 0, 1])
    >>> token_mean_predictions(np.array([9, 9, 9, 4]), y, folds, 2).tolist()
    [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [7.0, 3.0]]
    """
    return fold_predictions(token_mean_fitter(token_ids, y), folds, n_folds)


def bigram_mean_predictions(
    previous_ids: Int[np.ndarray, " n"],
    token_ids: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: mean target per (previous token, token) pair outside fold ``f``.

    Pairs unseen outside fold ``f`` back off to the token-type mean (:func:`token_mean_predictions`),
    which backs off to the training mean. ``previous_ids`` is ``-1`` for a sequence's first token.

    >>> prev = np.array([1, 2, 1, 2, 5]); cur = np.array([7, 7, 7, 7, 7]); folds = np.array([0, 0, 1, 1, 1])
    >>> y = np.array([1.0, 9.0, 1.0, 9.0, 4.0])
    >>> bigram_mean_predictions(prev, cur, y, folds, 2)[[0, 1, 4], [0, 0, 1]].tolist()   # pair, pair, unseen -> unigram
    [1.0, 9.0, 5.0]
    """
    return fold_predictions(bigram_mean_fitter(previous_ids, token_ids, y), folds, n_folds)


def _one_hot(values: Int[np.ndarray, " n"], edges: np.ndarray) -> Float[np.ndarray, "n b"]:
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 1)
    out = np.zeros((len(values), len(edges)))
    out[np.arange(len(values)), bins] = 1.0
    return out


def position_features(
    positions: Int[np.ndarray, " n"], span_positions: Int[np.ndarray, " n"]
) -> Float[np.ndarray, "n p"]:
    """One-hot bins (:data:`POSITION_EDGES`) of the position in the sequence and in the scored span."""
    return np.concatenate(
        [_one_hot(np.asarray(positions), POSITION_EDGES), _one_hot(np.asarray(span_positions), POSITION_EDGES)],
        axis=1,
    )


def position_predictions(
    positions: Int[np.ndarray, " n"],
    span_positions: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: a step function of position (sequence and scored span) fitted outside fold ``f``.

    Ridge (alpha 1e-3) on :func:`position_features`: about the mean target per position bin,
    additively over the two position variables.

    >>> pos = np.tile(np.arange(10), 20); folds = np.repeat(np.arange(4), 50)
    >>> y = np.sin(pos); pred = position_predictions(pos, pos, y, folds, 4)
    >>> bool(np.abs(pred[np.arange(200), folds] - y).max() < 0.02)
    True
    """
    return fold_predictions(position_fitter(positions, span_positions, y), folds, n_folds)


def covariate_predictions(
    covariate: Float[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
    n_bins: int = 20,
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: ``y`` predicted from a covariate, fitted outside fold ``f``.

    Features: the covariate itself and one-hot bins at its training-fold quantiles (a linear
    plus step function, so a monotone but curved relation is captured too).
    """
    return fold_predictions(covariate_fitter(covariate, y, n_bins), folds, n_folds)


def previous_token_ids(
    token_ids: Int[np.ndarray, " n"], sequence_ids: Int[np.ndarray, " n"], positions: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """The token at ``position - 1`` of the same sequence (tokens in capture order), else ``-1``.

    >>> previous_token_ids(np.array([5, 6, 7, 8]), np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0])).tolist()
    [-1, 5, 6, -1]
    """
    token_ids, sequence_ids, positions = (np.asarray(a, np.int64) for a in (token_ids, sequence_ids, positions))
    out = np.full(len(token_ids), -1, np.int64)
    follows = (sequence_ids[1:] == sequence_ids[:-1]) & (positions[1:] == positions[:-1] + 1)
    out[1:][follows] = token_ids[:-1][follows]
    return out


def span_positions(
    scored, sequence_ids: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """Per token (capture order): how many scored tokens of its sequence come before it.

    For a conversation with one assistant turn this is the offset into the response; for a
    plain text with every token scored it equals the position.

    >>> span_positions(np.array([0, 0, 1, 1, 1, 0, 1], bool), np.array([0, 0, 0, 0, 0, 1, 1])).tolist()
    [0, 0, 0, 1, 2, 0, 0]
    """
    scored = np.asarray(scored, np.int64)
    sequence_ids = np.asarray(sequence_ids)
    before = np.cumsum(scored) - scored  # scored tokens before each token, over the whole array
    starts = np.flatnonzero(np.r_[True, sequence_ids[1:] != sequence_ids[:-1]])
    first = np.repeat(before[starts], np.diff(np.r_[starts, len(scored)]))
    return before - first
