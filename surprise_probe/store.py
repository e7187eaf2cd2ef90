"""The capture format, in memory and on disk, and its lazy reader.

A capture is a list of shards; each shard holds whole sequences, flattened to their real
(non-padding) tokens. On disk (see docs/capture.md)::

    run.json            identity of the run, written first (used to refuse or resume)
    shards/000000/      one folder per shard, written under shards/.tmp-000000 then renamed
        token_ids.npy sequence_ids.npy positions.npy input_surprise.npy output_entropy.npy
        scored.npy <hook>.npy ... shard.json
    manifest.json       written last and atomically; its presence means the run is complete
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Int

from surprise_probe.jsonio import write_json

__all__ = [
    "CaptureShard",
    "Capture",
    "load_capture",
    "hook_depth",
    "write_shard",
    "COLUMNS",
]

FORMAT_VERSION = 1
COLUMNS = ("token_ids", "sequence_ids", "positions", "input_surprise", "output_entropy", "scored")
_COLUMN_DTYPES = {
    "token_ids": np.int64,
    "sequence_ids": np.int64,
    "positions": np.int64,
    "input_surprise": np.float32,
    "output_entropy": np.float32,
    "scored": np.bool_,
}


def hook_depth(hook: str) -> float:
    """How many blocks the residual stream has passed through at ``hook`` (the layer-sweep x axis).

    >>> hook_depth("blocks.0.hook_resid_pre"), hook_depth("blocks.3.hook_resid_post")
    (0, 4)
    >>> hook_depth("blocks.3.hook_resid_mid")
    3.5
    """
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if not match:
        return 0 if hook in ("hook_embed", "hook_pos_embed") else float("nan")
    layer, rest = int(match.group(1)), match.group(2)
    if rest == "hook_resid_pre":
        return layer
    if rest == "hook_resid_post":
        return layer + 1
    return layer + 0.5


@dataclass
class CaptureShard:
    """Whole sequences, real tokens only. Activations load per hook on demand."""

    index: int
    token_ids: Int[np.ndarray, " n"]
    sequence_ids: Int[np.ndarray, " n"]
    positions: Int[np.ndarray, " n"]
    input_surprise: Float[np.ndarray, " n"]
    output_entropy: Float[np.ndarray, " n"]
    scored: Bool[np.ndarray, " n"]
    hooks: tuple[str, ...]
    folder: Path | None = None
    _activations: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.token_ids)

    def activations(self, hook: str) -> Float[np.ndarray, "n d_model"]:
        """Activations at ``hook`` for every token of the shard (memory-mapped from disk)."""
        if hook not in self.hooks:
            raise KeyError(f"hook {hook!r} was not captured; captured hooks: {list(self.hooks)}")
        if hook in self._activations:
            return self._activations[hook]
        assert self.folder is not None
        return np.load(self.folder / f"{hook}.npy", mmap_mode="r")

    def column(self, name: str) -> np.ndarray:
        if name not in COLUMNS:
            raise KeyError(f"unknown column {name!r}; columns: {list(COLUMNS)}")
        return getattr(self, name)

    @property
    def n_sequences(self) -> int:
        return len(np.unique(self.sequence_ids))


class Capture:
    """Result of :func:`surprise_probe.capture`, in memory or read lazily from a folder.

    >>> run = load_capture("runs/capture")       # doctest: +SKIP
    >>> for shard in run.shards():               # doctest: +SKIP
    ...     x = shard.activations(run.hooks[-1])[shard.scored]
    ...     y = shard.input_surprise[shard.scored]
    """

    def __init__(self, manifest: dict, shards: list[CaptureShard] | None = None, path: Path | None = None):
        self.manifest = manifest
        self.path = path
        self._shards = shards

    # identity --------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def n_sequences(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return len(self._shards) if self._shards is not None else len(self.manifest["shards"])

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else " (in memory)"
        return (
            f"Capture({self.model_id!r}, {self.n_sequences} sequences, {self.n_tokens} tokens, "
            f"{len(self.hooks)} hooks, {self.n_shards} shards{where})"
        )

    # data ------------------------------------------------------------------------------------
    def shards(self) -> Iterator[CaptureShard]:
        """Shards in order; on disk, one at a time so memory stays bounded by a shard."""
        if self._shards is not None:
            yield from self._shards
            return
        assert self.path is not None
        for entry in self.manifest["shards"]:
            yield read_shard(self.path / "shards" / entry["name"], self.hooks)

    def column(self, name: str, scored_only: bool = False) -> np.ndarray:
        """A per-token column (e.g. ``"input_surprise"``) concatenated over shards."""
        parts = []
        for shard in self.shards():
            values = shard.column(name)
            parts.append(values[shard.scored] if scored_only else values)
        return np.concatenate(parts)

    def activations(self, hook: str, scored_only: bool = False) -> Float[np.ndarray, "n d_model"]:
        """All activations at one hook, concatenated (loads only that hook's files)."""
        if hook not in self.hooks:
            raise KeyError(f"hook {hook!r} was not captured; captured hooks: {self.hooks}")
        parts = []
        for shard in self.shards():
            values = shard.activations(hook)
            parts.append(np.asarray(values[shard.scored] if scored_only else values))
        return np.concatenate(parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"{index:06d}"


def write_shard(root: Path, shard: CaptureShard) -> dict:
    """Write ``shard`` under ``root/shards`` atomically (temp folder, then rename); return its entry."""
    shards_dir = Path(root) / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    final = shards_dir / shard_name(shard.index)
    tmp = shards_dir / f".tmp-{shard_name(shard.index)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name in COLUMNS:
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(shard.column(name), dtype=_COLUMN_DTYPES[name]))
        files[f"{name}.npy"] = _sha256(tmp / f"{name}.npy")
    for hook in shard.hooks:
        np.save(tmp / f"{hook}.npy", np.ascontiguousarray(shard._activations[hook]))
        files[f"{hook}.npy"] = _sha256(tmp / f"{hook}.npy")
    entry = {
        "name": final.name,
        "index": shard.index,
        "n_tokens": len(shard),
        "n_sequences": shard.n_sequences,
        "n_scored": int(shard.scored.sum()),
        "first_sequence": int(shard.sequence_ids.min()),
        "last_sequence": int(shard.sequence_ids.max()),
        "files": files,
    }
    write_json(tmp / "shard.json", entry)
    os.replace(tmp, final)
    return entry


def read_shard(folder: Path, hooks: list[str]) -> CaptureShard:
    entry = json.loads((folder / "shard.json").read_text())
    columns = {name: np.load(folder / f"{name}.npy") for name in COLUMNS}
    return CaptureShard(index=entry["index"], hooks=tuple(hooks), folder=folder, **columns)


def completed_shards(root: Path) -> dict[int, dict]:
    """Entries of the shards fully written under ``root`` (a renamed folder is complete)."""
    shards_dir = Path(root) / "shards"
    if not shards_dir.exists():
        return {}
    out = {}
    for folder in sorted(shards_dir.iterdir()):
        if folder.name.startswith(".tmp-") or not (folder / "shard.json").exists():
            continue
        entry = json.loads((folder / "shard.json").read_text())
        out[int(entry["index"])] = entry
    return out


def content_hash(entries: list[dict]) -> str:
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e["index"]):
        for name, sha in sorted(entry["files"].items()):
            digest.update(f"{entry['name']}/{name}:{sha}\n".encode())
    return digest.hexdigest()


def load_capture(path: str | Path, verify: bool = False) -> Capture:
    """Open a capture folder written by ``capture(..., out_dir=path)``; data loads lazily.

    ``verify=True`` re-hashes every file against the manifest.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        if (path / "run.json").exists():
            done = len(completed_shards(path))
            raise FileNotFoundError(
                f"capture at {path} is incomplete ({done} shard(s) written, no manifest.json); "
                "rerun the same capture command to resume it"
            )
        raise FileNotFoundError(f"{path} is not a capture folder (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has capture format {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    if verify:
        for entry in manifest["shards"]:
            for name, sha in entry["files"].items():
                actual = _sha256(path / "shards" / entry["name"] / name)
                if actual != sha:
                    raise ValueError(f"{path}/shards/{entry['name']}/{name} does not match its manifest hash")
    return Capture(manifest, path=path)
