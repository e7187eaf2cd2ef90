"""Folds grouped by sequence."""

import numpy as np
import pytest
from surprise_probe.probes import GroupedKFold, assign_folds


def test_no_sequence_is_on_both_sides_of_any_split():
    rng = np.random.default_rng(0)
    sequence_ids = rng.integers(0, 37, size=2000)
    X = np.zeros((len(sequence_ids), 1))
    seen_in_test = []
    for train, test in GroupedKFold(5, seed=3).split(X, groups=sequence_ids):
        assert not set(sequence_ids[train]) & set(sequence_ids[test])
        seen_in_test.extend(np.unique(sequence_ids[test]))
    assert sorted(seen_in_test) == sorted(
        np.unique(sequence_ids)
    )  # each sequence tested exactly once


def test_folds_are_balanced_seeded_and_order_free():
    sequence_ids = np.repeat(np.arange(23), 4)
    folds = assign_folds(sequence_ids, 5, seed=1)
    per_fold = np.bincount(folds[::4], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1
    np.testing.assert_array_equal(folds, assign_folds(sequence_ids, 5, seed=1))
    assert not np.array_equal(folds, assign_folds(sequence_ids, 5, seed=2))
    shuffled = np.random.default_rng(0).permutation(len(sequence_ids))
    np.testing.assert_array_equal(assign_folds(sequence_ids[shuffled], 5, seed=1), folds[shuffled])


def test_fewer_sequences_than_folds_is_an_error():
    with pytest.raises(ValueError, match="3 sequences cannot fill 5 folds"):
        assign_folds(np.array([0, 0, 1, 2]), 5)
    # One sequence: no number of folds works ("use at most 1 folds" was no advice: folds must be >= 2).
    with pytest.raises(ValueError, match=r"needs at least 2 sequences \(one to hold out, one to train on\), got 1; "
                                         r"capture more sequences"):
        assign_folds(np.array([4, 4, 4]), 5)
    with pytest.raises(ValueError, match="needs groups="):
        list(GroupedKFold(2).split(np.zeros((4, 1))))
