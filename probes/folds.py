"""Cross-validation folds grouped by sequence: no sequence is ever on both sides of a split.

Tokens of one sequence share context, so a token-level random split would let a probe memorise a
sequence from its training tokens and be scored on its neighbours. Folds here are assigned per
sequence id by a seeded permutation, which balances the number of sequences per fold.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from jaxtyping import Int

__all__ = ["assign_folds", "GroupedKFold"]


def assign_folds(
    sequence_ids: Int[np.ndarray, " n"], n_folds: int, seed: int = 0
) -> Int[np.ndarray, " n"]:
    """Fold index (``0..n_folds-1``) of every token, constant within a sequence.

    The distinct sequence ids are sorted, permuted with ``seed`` and dealt round-robin, so the
    assignment depends only on the set of sequence ids, ``n_folds`` and ``seed``.

    >>> assign_folds(np.array([7, 7, 3, 9, 3]), n_folds=3, seed=0).tolist()
    [2, 2, 1, 0, 1]
    """
    sequence_ids = np.asarray(sequence_ids)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    unique, inverse = np.unique(sequence_ids, return_inverse=True)
    if len(unique) < 2:
        raise ValueError(
            f"cross-validation grouped by sequence needs at least 2 sequences (one to hold out, one to train on), "
            f"got {len(unique)}; capture more sequences"
        )
    if len(unique) < n_folds:
        raise ValueError(
            f"{len(unique)} sequences cannot fill {n_folds} folds grouped by sequence (each fold needs at least "
            f"one); use at most {len(unique)} folds or capture more sequences"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_unique = np.empty(len(unique), dtype=np.int64)
    fold_of_unique[order] = np.arange(len(unique)) % n_folds
    return fold_of_unique[inverse.reshape(-1)]


class GroupedKFold:
    """A scikit-learn CV splitter with :func:`assign_folds` semantics (seeded, grouped).

    >>> from sklearn.model_selection import cross_val_score       # doctest: +SKIP
    >>> cross_val_score(RidgeProbe(), X, y, groups=sequence_ids,  # doctest: +SKIP
    ...                 cv=GroupedKFold(5, seed=0))
    """

    def __init__(self, n_splits: int = 5, seed: int = 0):
        self.n_splits = n_splits
        self.seed = seed

    def get_n_splits(self, X=None, y=None, groups=None) -> int:  # noqa: ARG002 - sklearn protocol
        return self.n_splits

    def split(self, X, y=None, groups=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # noqa: ARG002
        if groups is None:
            raise ValueError("GroupedKFold needs groups= (the sequence id of every row)")
        groups = np.asarray(groups)
        if len(groups) != len(X):
            raise ValueError(f"groups has {len(groups)} entries but X has {len(X)} rows")
        folds = assign_folds(groups, self.n_splits, self.seed)
        for fold in range(self.n_splits):
            yield np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)

    def __repr__(self) -> str:
        return f"GroupedKFold(n_splits={self.n_splits}, seed={self.seed})"
