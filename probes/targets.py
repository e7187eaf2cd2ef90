"""What a probe predicts, token by token: input surprise, output entropy, or user values.

Selection rules (the tokens a probe is fitted and scored on). By default (``span="scored"``)
**every target uses the same tokens**: the scored span (assistant content of conversations,
every token of plain texts, unless the capture used ``score_prompt``) at position > 0 (position 0
has no input surprise; for a plain text it is BOS, whose entropy is a constant). So surprise,
entropy and custom-target sweeps are comparable token for token:

- ``"surprise"`` / ``"entropy"``: the span's tokens;
- a :class:`TokenTarget` table keyed by ``(sequence_id, position)``: the listed tokens inside the
  span (every key must exist in the capture, each once; listed tokens outside the span, e.g.
  chat-template markup, are left out and counted in ``TargetData.n_outside_span``);
- a 1-D array with one value per captured token in shard order: the span's tokens.

``span="all"``: every token at position > 0 for surprise and entropy (prompt included), every
listed token of a table, every captured token of an array.

Selected tokens must have finite targets; anything else is an error that names the token.

>>> from surprise_probe.probes import ArrayCapture
>>> run = ArrayCapture({"h": np.zeros((4, 2))}, model_id="m", token_ids=np.array([5, 6, 7, 8]),
...     sequence_ids=np.array([0, 0, 0, 0]), positions=np.arange(4), scored=np.array([0, 1, 1, 1], bool),
...     input_surprise=np.array([np.nan, 1.0, 2.0, 3.0]), output_entropy=np.ones(4))
>>> every = TokenTarget("mine", np.zeros(4, int), np.arange(4), np.array([9.0, 1.0, 2.0, 4.0]))
>>> data = select_target(run, every)
>>> data.positions.tolist(), data.n_outside_span, data.span
([1, 2, 3], 1, 'scored')
>>> select_target(run, every, span="all").positions.tolist()
[0, 1, 2, 3]
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Int
from surprise_probe.probes.controls import previous_token_ids, span_positions

from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.storage import write_atomic

__all__ = [
    "TokenTarget",
    "TargetData",
    "select_target",
    "load_target_file",
    "shard_label",
    "lookup_target",
]

BUILTIN_TARGETS = ("surprise", "entropy")
SPANS = {
    "scored": "the scored span (assistant content / whole texts) at position > 0, as for surprise and entropy",
    "all": "every token the target gives (surprise/entropy: every token at position > 0, prompt included)",
}


@dataclass(frozen=True)
class TokenTarget:
    """User per-token values keyed by ``(sequence_id, position)``.

    >>> import tempfile
    >>> target = TokenTarget("label", np.array([0, 0, 1]), np.array([1, 2, 1]), np.array([0.5, 1.5, 2.0]))
    >>> paths = target.save(Path(tempfile.mkdtemp()) / "label")   # label.npz + label.json
    >>> load_target_file(paths["npz"]).values.tolist()
    [0.5, 1.5, 2.0]
    """

    name: str
    sequence_ids: Int[np.ndarray, " m"]
    positions: Int[np.ndarray, " m"]
    values: Float[np.ndarray, " m"]

    def __post_init__(self):
        lengths = {len(self.sequence_ids), len(self.positions), len(self.values)}
        if len(lengths) != 1:
            raise ValueError(
                f"target {self.name!r}: sequence_ids, positions and values must have one length, got "
                f"{len(self.sequence_ids)}, {len(self.positions)}, {len(self.values)}"
            )
        if len(self.positions) and np.min(self.positions) < 0:
            raise ValueError(
                f"target {self.name!r} has a negative position {np.min(self.positions)}"
            )

    def save(self, path: str | Path, info: dict | None = None) -> dict[str, Path]:
        """Write ``path.npz`` (readable by :func:`load_target_file`) and ``path.json`` (``info``)."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        npz = path.with_name(path.name + ".npz")
        data = io.BytesIO()
        np.savez(data, sequence_ids=self.sequence_ids, positions=self.positions, values=self.values)
        write_atomic(npz, data.getvalue())  # a file with the final name is always complete
        meta = write_json(
            path.with_name(path.name + ".json"),
            {"name": self.name, "n_tokens": len(self.values), **(info or {}), "versions": software_versions()},
        )
        return {"npz": npz, "json": meta}


@dataclass(frozen=True)
class _CaptureOrderTarget:
    name: str
    values: Float[np.ndarray, " n_tokens"]


@dataclass
class TargetData:
    """The selected tokens of a run, in shard order, with their targets."""

    name: str
    masks: list[np.ndarray]  # per shard (sizes differ): bool, which of its tokens are selected
    y: Float[np.ndarray, " n"]
    token_ids: Int[np.ndarray, " n"]
    sequence_ids: Int[np.ndarray, " n"]
    positions: Int[np.ndarray, " n"]
    previous_ids: Int[np.ndarray, " n"]  # token at position - 1 of the same sequence, -1 if none
    span_positions: Int[np.ndarray, " n"]  # scored tokens of the sequence before this one
    # input surprise and output entropy on scored tokens at position > 0 (for their correlation)
    pair_surprise: Float[np.ndarray, " m"]
    pair_entropy: Float[np.ndarray, " m"]
    pair_sequence_ids: Int[np.ndarray, " m"]
    span: str = "scored"  # which tokens (see SPANS)
    n_outside_span: int = 0  # tokens the target listed that the span left out

    @property
    def n_tokens(self) -> int:
        return len(self.y)

    @property
    def n_sequences(self) -> int:
        return len(np.unique(self.sequence_ids))

    def restrict(self, keep: Bool[np.ndarray, " n"]) -> TargetData:
        """The same run with only the selected tokens where ``keep`` is True."""
        keep = np.asarray(keep, bool)
        masks, offset = [], 0
        for mask in self.masks:
            count = int(mask.sum())
            narrowed = mask.copy()
            narrowed[np.flatnonzero(mask)] = keep[offset : offset + count]
            masks.append(narrowed)
            offset += count
        per_token = ("y", "token_ids", "sequence_ids", "positions", "previous_ids", "span_positions")
        return TargetData(
            name=self.name,
            masks=masks,
            **{name: getattr(self, name)[keep] for name in per_token},
            pair_surprise=self.pair_surprise,
            pair_entropy=self.pair_entropy,
            pair_sequence_ids=self.pair_sequence_ids,
            span=self.span,
            n_outside_span=self.n_outside_span,
        )


def shard_label(shard, index: int) -> str:
    """How errors name a shard: its folder if it has one, else its index."""
    folder = getattr(shard, "folder", None)
    return f"shard {folder}" if folder is not None else f"shard {getattr(shard, 'index', index)}"


def load_target_file(path: str | Path) -> TokenTarget | _CaptureOrderTarget:
    """Read a user target.

    ``.npz`` with arrays ``sequence_ids``, ``positions``, ``values``; or ``.npy`` of shape
    ``(m, 3)`` with those three columns; or a 1-D ``.npy`` with one value per captured token in
    shard order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"target {str(path)!r} is neither 'surprise', 'entropy' nor an existing .npy/.npz file"
        )
    name = path.stem
    if path.suffix == ".npz":
        with np.load(path) as data:
            missing = [k for k in ("sequence_ids", "positions", "values") if k not in data]
            if missing:
                raise ValueError(
                    f"target file {path} lacks array(s) {missing}; expected sequence_ids, positions, values "
                    f"(has {sorted(data.files)})"
                )
            return TokenTarget(
                name, data["sequence_ids"], data["positions"], data["values"].astype(np.float64)
            )
    if path.suffix != ".npy":
        raise ValueError(f"target file {path} must be .npy or .npz, got {path.suffix!r}")
    array = np.load(path)
    if array.ndim == 1:
        return _CaptureOrderTarget(name, array.astype(np.float64))
    if array.ndim == 2 and array.shape[1] == 3:
        keys = array[:, :2]
        if not np.all(np.isfinite(keys)) or not np.all(keys == np.round(keys)):
            raise ValueError(
                f"target file {path}: columns 0 and 1 (sequence_id, position) must be integers"
            )
        return TokenTarget(
            name,
            keys[:, 0].astype(np.int64),
            keys[:, 1].astype(np.int64),
            array[:, 2].astype(np.float64),
        )
    raise ValueError(
        f"target file {path} has shape {array.shape}; expected (n_tokens,) in capture order or "
        "(m, 3) columns sequence_id, position, value"
    )


def _keys(sequence_ids, positions, width: int) -> np.ndarray:
    return np.asarray(sequence_ids, np.int64) * width + np.asarray(positions, np.int64)


def lookup_target(
    target: TokenTarget, sequence_ids: Int[np.ndarray, " n"], positions: Int[np.ndarray, " n"]
) -> Float[np.ndarray, " n"]:
    """``target``'s value at each ``(sequence_id, position)``; NaN where the table has none.

    >>> table = TokenTarget("t", np.array([0, 1]), np.array([2, 0]), np.array([5.0, 6.0]))
    >>> lookup_target(table, np.array([1, 0, 0]), np.array([0, 2, 3])).tolist()
    [6.0, 5.0, nan]
    """
    positions = np.asarray(positions, np.int64)
    width = int(max(np.max(target.positions, initial=0), np.max(positions, initial=0))) + 1
    table_keys = _keys(target.sequence_ids, target.positions, width)
    order = np.argsort(table_keys, kind="stable")
    table_keys, values = table_keys[order], np.asarray(target.values, np.float64)[order]
    keys = _keys(sequence_ids, positions, width)
    out = np.full(len(keys), np.nan)
    if len(table_keys):
        where = np.clip(np.searchsorted(table_keys, keys), 0, len(table_keys) - 1)
        found = table_keys[where] == keys
        out[found] = values[where[found]]
    return out


def select_target(
    run, target: str | Path | TokenTarget | np.ndarray = "surprise", *, span: str = "scored"
) -> TargetData:
    """Read the small per-token columns of every shard and select the probe's tokens and targets.

    ``span``: ``"scored"`` (default: the same tokens for every target) or ``"all"``; see the
    module docstring.
    """
    if span not in SPANS:
        raise ValueError(f"span must be one of {list(SPANS)}, got {span!r}")
    builtin = str(target) if isinstance(target, str) and target in BUILTIN_TARGETS else None
    if isinstance(target, np.ndarray):
        if target.ndim != 1:
            raise ValueError(
                f"an array target must be 1-D (one value per captured token), got shape {target.shape}"
            )
        target = _CaptureOrderTarget("array", target.astype(np.float64))
    elif builtin is None and isinstance(target, (str, Path)):
        target = load_target_file(target)

    table = None
    if isinstance(target, TokenTarget):
        # one int64 key per token: sequence * width + position
        width = int(max(np.max(target.positions, initial=0), 0)) + 1
        table_keys = _keys(target.sequence_ids, target.positions, width)
        order = np.argsort(table_keys, kind="stable")
        table_keys, table_values = table_keys[order], np.asarray(target.values, np.float64)[order]
        duplicate = np.flatnonzero(np.diff(table_keys) == 0)
        if len(duplicate):
            i = order[duplicate[0]]
            raise ValueError(
                f"target {target.name!r} lists (sequence_id {target.sequence_ids[i]}, position "
                f"{target.positions[i]}) more than once; each token must appear once"
            )
        matched = np.zeros(len(table_keys), bool)
        table = (width, table_keys, table_values, matched)

    name = builtin or target.name
    masks, parts, pairs = [], [], []
    offset, too_short, outside = 0, False, 0
    for index, shard in enumerate(run.shards()):
        label = shard_label(shard, index)
        seq, pos = np.asarray(shard.sequence_ids), np.asarray(shard.positions)
        scored = np.asarray(shard.scored, bool)
        surprise = np.asarray(shard.input_surprise, np.float64)
        entropy = np.asarray(shard.output_entropy, np.float64)
        in_span = (scored if span == "scored" else np.ones(len(pos), bool)) & (pos > 0)
        if builtin == "surprise":
            mask, values = in_span, surprise
        elif builtin == "entropy":
            mask, values = in_span, entropy
        elif table is not None:
            width, table_keys, table_values, matched = table
            keys = _keys(seq, pos, width)
            where = np.clip(np.searchsorted(table_keys, keys), 0, max(len(table_keys) - 1, 0))
            mask = (
                (pos < width) & (table_keys[where] == keys)
                if len(table_keys)
                else np.zeros(len(keys), bool)
            )
            matched[where[mask]] = True
            values = np.full(len(keys), np.nan)
            values[mask] = table_values[where[mask]]
            if span == "scored":
                outside += int((mask & ~in_span).sum())
                mask = mask & in_span
        else:
            values = target.values[offset : offset + len(seq)]
            if len(values) != len(seq):
                too_short = True
                break  # reported below
            mask = in_span if span == "scored" else np.ones(len(seq), bool)
        offset += len(seq)
        bad = mask & ~np.isfinite(values)
        if bad.any():
            i = np.flatnonzero(bad)[0]
            raise ValueError(
                f"target {name!r} is {values[i]} (not finite) at sequence {seq[i]}, position {pos[i]} "
                f"in {label} ({int(bad.sum())} such token(s) there); expected finite values on every "
                "selected token"
            )
        masks.append(mask)
        token_ids = np.asarray(shard.token_ids)
        parts.append((
            values[mask], token_ids[mask], seq[mask], pos[mask],
            previous_token_ids(token_ids, seq, pos)[mask], span_positions(scored, seq)[mask],
        ))
        both = scored & (pos > 0) & np.isfinite(surprise) & np.isfinite(entropy)
        pairs.append((surprise[both], entropy[both], seq[both]))

    if isinstance(target, _CaptureOrderTarget) and (too_short or offset != len(target.values)):
        n_tokens = getattr(run, "n_tokens", "more")
        raise ValueError(
            f"target {name!r} has {len(target.values)} values but the capture has {n_tokens} tokens; "
            "a 1-D target needs one value per captured token in shard order (or use a table keyed by "
            "sequence_id and position)"
        )
    if table is not None and not table[3].all():
        width, table_keys, _, matched = table
        missing = table_keys[~matched]
        raise ValueError(
            f"target {name!r} has {len(missing)} (sequence_id, position) pair(s) that are not in the "
            f"capture, e.g. (sequence_id {missing[0] // width}, position {missing[0] % width}); "
            "the target is misaligned with the capture"
        )
    if not parts or sum(len(p[0]) for p in parts) == 0:
        raise ValueError(
            f"target {name!r} selects no tokens of this capture in span {span!r} ({SPANS[span]}); "
            "check the scored span, or pass span='all'"
        )
    y, token_ids, sequence_ids, positions, previous_ids, in_span_positions = (
        np.concatenate([p[k] for p in parts]) for k in range(6)
    )
    if np.ptp(y) == 0:
        raise ValueError(
            f"target {name!r} is constant ({y[0]} on all {len(y)} selected tokens); there is nothing to predict"
        )
    return TargetData(
        name=name,
        masks=masks,
        y=y.astype(np.float64),
        token_ids=token_ids.astype(np.int64),
        sequence_ids=sequence_ids.astype(np.int64),
        positions=positions.astype(np.int64),
        previous_ids=previous_ids.astype(np.int64),
        span_positions=in_span_positions.astype(np.int64),
        pair_surprise=np.concatenate([p[0] for p in pairs]),
        pair_entropy=np.concatenate([p[1] for p in pairs]),
        pair_sequence_ids=np.concatenate([p[2] for p in pairs]),
        span=span,
        n_outside_span=outside,
    )
