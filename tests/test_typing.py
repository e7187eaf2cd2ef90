"""The suite runs with jaxtyping + beartype checking every function of the package
(pyproject addopts); these tests fail if that checking is switched off."""

import jaxtyping
import numpy as np
import pytest
import torch

from surprise_probe.core.forward import metrics
from surprise_probe.core.utils import stats


def test_shape_annotations_are_checked_in_the_suite():
    with pytest.raises(jaxtyping.TypeCheckError, match="per_unit"):
        stats.bootstrap_sums(np.divide, np.ones(3), np.ones(4))  # 3 units vs 4 units
    with pytest.raises(jaxtyping.TypeCheckError, match="tokens"):
        metrics.input_surprise(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_plain_type_hints_are_checked_and_ints_count_as_floats():
    with pytest.raises(jaxtyping.TypeCheckError, match="statistic"):
        stats.bootstrap_sums("not a function", np.ones(3), np.ones(3))
    assert stats.zscore(3, np.array([0.0, 2.0, 4.0])) == pytest.approx(0.5)  # int for a float hint
