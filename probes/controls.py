"""Controls for probe results that need no activations: the token-identity mean baseline."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

__all__ = ["token_mean_predictions"]


def token_mean_predictions(
    token_ids: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    folds: Int[np.ndarray, " n"],
    n_folds: int,
) -> Float[np.ndarray, "n k"]:
    """Column ``f``: mean target of each token type over the tokens outside fold ``f``.

    Token types never seen outside fold ``f`` back off to the mean target outside fold ``f``.
    The out-of-fold prediction of token ``i`` is ``result[i, folds[i]]``.
    """
    types, inverse = np.unique(token_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((n_folds, len(types)))
    counts = np.zeros((n_folds, len(types)))
    for fold in range(n_folds):
        inside = folds == fold
        sums[fold] = np.bincount(inverse[inside], weights=y[inside], minlength=len(types))
        counts[fold] = np.bincount(inverse[inside], minlength=len(types))
    out = np.empty((len(y), n_folds))
    for fold in range(n_folds):
        train_sums, train_counts = sums.sum(0) - sums[fold], counts.sum(0) - counts[fold]
        global_mean = train_sums.sum() / train_counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(train_counts > 0, train_sums / train_counts, global_mean)
        out[:, fold] = means[inverse]
    return out
