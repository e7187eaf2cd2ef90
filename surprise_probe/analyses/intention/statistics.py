"""Topic-entropy statistics: the plug-in entropy of topic labels, the modal topic's share, their
nested bootstrap over prompt groups and samples, and the uniform-choice reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

from surprise_probe.core.utils.stats import bootstrap_nested

__all__ = ["topic_entropy"]


def topic_entropy(labels: Sequence[str]) -> float:
    """Plug-in entropy (nats) of a list of labels; buckets count as labels.

    >>> round(topic_entropy(["apple", "apple", "banana", "other"]), 4)
    1.0397
    """
    _, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _entropy_of_counts(counts: Float[np.ndarray, "boot labels"]) -> Float[np.ndarray, " boot"]:
    p = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(-1)


def _share_of_mode(counts: Float[np.ndarray, "boot labels"], is_topic: np.ndarray) -> Float[np.ndarray, " boot"]:
    topic_counts = np.where(is_topic, counts, 0)
    return topic_counts.max(-1) / counts.sum(-1)


def _nested_estimate(
    codes: Sequence[Int[np.ndarray, " n"]],
    groups: Int[np.ndarray, " rows"],
    statistic,
    n_labels: int,
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> dict:
    """Mean over rows of ``statistic(label counts of the row)``, CI over prompt groups and samples."""
    rows = [np.asarray(c, np.int64) for c in codes]

    def of_draws(draws: Int[np.ndarray, "boot n"]) -> Float[np.ndarray, " boot"]:
        counts = np.zeros((draws.shape[0], n_labels))
        np.add.at(counts, (np.repeat(np.arange(draws.shape[0]), draws.shape[1]), draws.reshape(-1)), 1.0)
        return statistic(counts)

    value, low, high, per_row = bootstrap_nested(of_draws, rows, groups, n_boot=n_boot, level=level, seed=seed)
    return {
        "value": value, "low": low, "high": high, "level": level,
        "n_rows": len(rows), "n_prompts": len(set(np.asarray(groups).tolist())),
        "n_samples": int(sum(len(c) for c in rows)), "per_row": per_row.tolist(),
    }


def _uniform_reference(n_topics: Sequence[int], n_samples: int, seed: int, n_draws: int = 2000) -> float:
    """Expected plug-in entropy of ``n_samples`` uniform draws over each row's topics (a ceiling)."""
    rng = np.random.default_rng(seed)
    values = []
    for n in sorted(set(n_topics)):
        draws = rng.integers(0, n, size=(n_draws, n_samples))
        counts = np.zeros((n_draws, n))
        np.add.at(counts, (np.repeat(np.arange(n_draws), n_samples), draws.reshape(-1)), 1.0)
        values.append((n, float(_entropy_of_counts(counts).mean())))
    lookup = dict(values)
    return float(np.mean([lookup[n] for n in n_topics]))
