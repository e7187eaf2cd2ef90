"""Activations from elsewhere, wrapped in the capture interface the probes read.

``surprise_probe.core.capture.run`` produces runs with ``hooks``, ``model_id``, ``d_model`` and ``shards()``;
:class:`ArrayCapture` builds the same thing from numpy arrays (tests, or activations computed by
other tools), so every probe function takes either.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from jaxtyping import Bool, Float, Int

from surprise_probe.core.capture.store import CaptureShard

__all__ = ["ArrayCapture"]


class ArrayCapture:
    """A capture held in numpy arrays, split into shards of whole sequences.

    >>> rng = np.random.default_rng(0)
    >>> seq = np.repeat(np.arange(10), 5); pos = np.tile(np.arange(5), 10)
    >>> run = ArrayCapture(
    ...     {"blocks.0.hook_resid_post": rng.normal(size=(50, 4))}, token_ids=rng.integers(0, 9, 50),
    ...     sequence_ids=seq, positions=pos, input_surprise=rng.normal(size=50), sequences_per_shard=4)
    >>> run.n_shards, run.d_model
    (3, 4)
    """

    def __init__(
        self,
        activations: dict[str, Float[np.ndarray, "n d"]],
        *,
        token_ids: Int[np.ndarray, " n"],
        sequence_ids: Int[np.ndarray, " n"],
        positions: Int[np.ndarray, " n"],
        input_surprise: Float[np.ndarray, " n"] | None = None,
        output_entropy: Float[np.ndarray, " n"] | None = None,
        scored: Bool[np.ndarray, " n"] | None = None,
        model_id: str = "arrays",
        sequences_per_shard: int = 64,
        manifest: dict | None = None,
    ):
        n = len(token_ids)
        nan = np.full(n, np.nan, dtype=np.float32)
        columns = {
            "token_ids": np.asarray(token_ids, np.int64),
            "sequence_ids": np.asarray(sequence_ids, np.int64),
            "positions": np.asarray(positions, np.int64),
            "input_surprise": nan if input_surprise is None else np.asarray(input_surprise),
            "output_entropy": nan if output_entropy is None else np.asarray(output_entropy),
            "scored": np.ones(n, bool) if scored is None else np.asarray(scored, bool),
        }
        for name, values in list(columns.items()) + [
            (f"activations[{h!r}]", a) for h, a in activations.items()
        ]:
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} rows but token_ids has {n}")
        dims = {hook: np.shape(a)[1] for hook, a in activations.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"all hooks must have the same width, got {dims}")
        if not activations:
            raise ValueError("ArrayCapture needs activations for at least one hook")
        self.model_id = model_id
        self.hooks = list(activations)
        self.d_model = int(next(iter(dims.values())))
        self.manifest = dict(manifest or {})
        unique = np.unique(columns["sequence_ids"])
        self.n_sequences, self.n_tokens = len(unique), n
        shard_of_sequence = np.searchsorted(unique, columns["sequence_ids"]) // max(
            1, sequences_per_shard
        )
        self._shards = []
        for index in range(int(shard_of_sequence.max()) + 1):
            rows = np.flatnonzero(shard_of_sequence == index)
            self._shards.append(
                CaptureShard(
                    **{name: values[rows] for name, values in columns.items()},
                    _activations={hook: np.asarray(a)[rows] for hook, a in activations.items()},
                    hooks=tuple(self.hooks),
                    index=index,
                )
            )

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def shards(self) -> Iterator[CaptureShard]:
        yield from self._shards

    def __repr__(self) -> str:
        return f"ArrayCapture({self.model_id!r}, {self.n_sequences} sequences, {self.n_tokens} tokens, hooks={self.hooks})"
