"""Controls for probe results that need no activations, each learned on the training folds only.

Every function returns an ``(n, k)`` array: column ``f`` is the prediction of the control fitted
on the tokens outside fold ``f``, so the out-of-fold prediction of token ``i`` is
``result[i, folds[i]]`` and the residual target of fold ``f``'s training set is ``y - result[:, f]``.

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

import numpy as np
from jaxtyping import Float, Int
from surprise_probe.probes.ridge import RidgeStats, solve_ridge

__all__ = [
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


def _group_mean_predictions(
    groups: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
    fallback: Float[np.ndarray, "n k"],
) -> Float[np.ndarray, "n k"]:
    """Mean of ``y`` per group on the training folds; groups unseen there take ``fallback``."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    sums = np.zeros((n_folds, n_groups))
    counts = np.zeros((n_folds, n_groups))
    for fold in range(n_folds):
        inside = folds == fold
        sums[fold] = np.bincount(groups[inside], weights=y[inside], minlength=n_groups)
        counts[fold] = np.bincount(groups[inside], minlength=n_groups)
    out = np.empty((len(y), n_folds))
    for fold in range(n_folds):
        train_sums, train_counts = sums.sum(0) - sums[fold], counts.sum(0) - counts[fold]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = train_sums / train_counts
        seen = train_counts[groups] > 0
        out[:, fold] = np.where(seen, means[groups], fallback[:, fold])
    return out


def _training_means(y, folds, n_folds) -> Float[np.ndarray, "n k"]:
    means = [y[folds != fold].mean() for fold in range(n_folds)]
    return np.broadcast_to(np.asarray(means), (len(y), n_folds)).copy()


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
    _, groups = np.unique(token_ids, return_inverse=True)
    return _group_mean_predictions(
        groups.reshape(-1), y, folds, n_folds, _training_means(y, folds, n_folds)
    )


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
    pairs = np.stack([np.asarray(previous_ids, np.int64), np.asarray(token_ids, np.int64)], axis=1)
    _, groups = np.unique(pairs, axis=0, return_inverse=True)
    unigram = token_mean_predictions(token_ids, y, folds, n_folds)
    return _group_mean_predictions(groups.reshape(-1), y, folds, n_folds, unigram)


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


def _fold_ridge(
    features_for_fold, y: Float[np.ndarray, " n"], folds: Int[np.ndarray, " n"], n_folds: int
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: ridge (raw features, unpenalised intercept) fitted outside fold ``f``."""
    out = np.empty((len(y), n_folds))
    for fold in range(n_folds):
        features = features_for_fold(fold)
        train = folds != fold
        stats = RidgeStats(
            features.shape[1], 1, shift_x=features[train].mean(0), shift_y=np.array([y[train].mean()])
        ).update(features[train], y[train])
        solution = solve_ridge(stats, [_CONTROL_ALPHA], standardize=False)
        out[:, fold] = features @ solution.coef[0, 0] + solution.intercept[0, 0]
    return out


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
    features = position_features(positions, span_positions)
    return _fold_ridge(lambda fold: features, np.asarray(y, np.float64), folds, n_folds)


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
    covariate = np.asarray(covariate, np.float64)

    def features(fold: int) -> np.ndarray:
        train = covariate[folds != fold]
        edges = np.unique(np.quantile(train, np.linspace(0, 1, n_bins + 1)[:-1]))
        bins = np.clip(np.searchsorted(edges, covariate, side="right") - 1, 0, len(edges) - 1)
        one_hot = np.zeros((len(covariate), len(edges)))
        one_hot[np.arange(len(covariate)), bins] = 1.0
        return np.concatenate([covariate[:, None], one_hot], axis=1)

    return _fold_ridge(features, np.asarray(y, np.float64), folds, n_folds)


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
