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

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Int

from surprise_probe.core.utils.jsonio import read_json, write_json
from surprise_probe.core.utils.notebook import NotebookView
from surprise_probe.core.utils.storage import storage_errors

__all__ = [
    "CaptureShard",
    "Capture",
    "load_capture",
    "write_shard",
    "ShardWriter",
    "verify_capture",
    "COLUMNS",
]

FORMAT_VERSION = 1
# How a shard's "files" digests are made (recorded per shard as "file_digest"): SHA-256 of the .npy
# header followed by the per-sequence SHA-256s of the data. Shards without it hash the whole file.
FILE_DIGEST = "npy-header+sequence-sha256"
COLUMNS = ("token_ids", "sequence_ids", "positions", "input_surprise", "output_entropy", "scored")
_COLUMN_DTYPES = {
    "token_ids": np.int64,
    "sequence_ids": np.int64,
    "positions": np.int64,
    "input_surprise": np.float32,
    "output_entropy": np.float32,
    "scored": np.bool_,
}


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
        return _load_npy(self.folder / f"{hook}.npy", mmap_mode="r")

    def column(self, name: str) -> np.ndarray:
        if name not in COLUMNS:
            raise KeyError(f"unknown column {name!r}; columns: {list(COLUMNS)}")
        return getattr(self, name)

    @property
    def n_sequences(self) -> int:
        return len(np.unique(self.sequence_ids))


class Capture(NotebookView):
    """Result of :func:`surprise_probe.core.capture.run`, in memory or read lazily from a folder.

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

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        hooks = self.hooks
        scored = self.manifest.get("n_scored_tokens")
        return repr(self), [
            ("model", self.model_id),
            ("sequences", str(self.n_sequences)),
            ("tokens", f"{self.n_tokens}" + ("" if scored is None else f" ({scored} scored)")),
            ("hooks", f"{len(hooks)}: {hooks[0]} ... {hooks[-1]}" if len(hooks) > 2 else ", ".join(hooks)),
            ("activations", f"d_model {self.d_model}, {self.manifest.get('dtype', '?')}, {self.n_shards} shards"),
            ("folder", str(self.path) if self.path else "in memory (capture(..., out_dir=...) writes one)"),
        ]

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


class SequenceDigests:
    """SHA-256 of each sequence's rows in each file, fed in order in chunks of any size.

    The capture's content hash is built from these, so it depends on the data alone, not on how
    the sequences were cut into shards (``shard_size``) or spread over ranks. ``lengths`` are the
    shard's sequences' token counts, in order.
    """

    def __init__(self, lengths) -> None:
        self.bounds = np.cumsum(np.asarray(lengths, dtype=np.int64)).tolist()
        self.state: dict[str, tuple[list[bytes], object, int]] = {}

    def add(self, name: str, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        done, hasher, position = self.state.get(name) or ([], hashlib.sha256(), 0)
        row_bytes = rows.nbytes // max(len(rows), 1)
        data, offset = memoryview(rows).cast("B"), 0
        while offset < len(rows):
            take = min(self.bounds[len(done)] - position, len(rows) - offset)
            hasher.update(data[offset * row_bytes : (offset + take) * row_bytes])
            offset, position = offset + take, position + take
            if position == self.bounds[len(done)]:
                done.append(hasher.digest())
                hasher = hashlib.sha256()
        self.state[name] = (done, hasher, position)

    def file_hexdigest(self, name: str, header: bytes) -> str:
        """A file's digest: its ``.npy`` header, then its sequences' digests (no byte hashed twice)."""
        return hashlib.sha256(header + b"".join(self.state.get(name, ([],))[0])).hexdigest()

    def hexdigests(self) -> list[str]:
        """One digest per sequence, over every file's rows (files in name order)."""
        n = len(self.bounds)
        short = {name: len(done) for name, (done, _, _) in self.state.items() if len(done) != n}
        if short:
            raise ValueError(f"expected rows for {n} sequences per file, got {short}")
        names = sorted(self.state)
        return [
            hashlib.sha256(b"".join(name.encode() + b":" + self.state[name][0][i] for name in names)).hexdigest()
            for i in range(n)
        ]


def _npy_header(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """The ``.npy`` header ``np.save`` writes for ``array`` (or for its dtype at ``shape``)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
        "shape": tuple(array.shape if shape is None else shape),
    })
    return buffer.getvalue()


def _file_digest(file: Path, lengths: list[int]) -> str:
    """Recompute a stored file's :data:`FILE_DIGEST`-style digest from its bytes."""
    with open(file, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        length = handle.tell()
        handle.seek(0)
        header = handle.read(length)
    array = _load_npy(file, mmap_mode="r")
    sequences = SequenceDigests(lengths)
    block = 4096  # rows per read: bounded memory on large shards
    for start in range(0, len(array), block):
        sequences.add(file.name, np.asarray(array[start : start + block]))
    return sequences.file_hexdigest(file.name, header)


def _sequence_lengths(sequence_ids: np.ndarray) -> list[int]:
    """Token counts of the consecutive runs of equal ids (a shard's sequences, in order)."""
    ids = np.asarray(sequence_ids)
    if not len(ids):
        return []
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return np.diff(np.r_[starts, len(ids)]).tolist()


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
    files, sizes = {}, {}
    arrays = {name: np.ascontiguousarray(shard.column(name), dtype=_COLUMN_DTYPES[name]) for name in COLUMNS}
    arrays.update({hook: np.ascontiguousarray(shard._activations[hook]) for hook in shard.hooks})
    sequences = SequenceDigests(_sequence_lengths(arrays["sequence_ids"]))
    try:
        with _shard_errors(tmp, shard.index):
            tmp.mkdir()
        for name, array in arrays.items():
            with _shard_errors(tmp / f"{name}.npy", shard.index):
                np.save(tmp / f"{name}.npy", array)
            sequences.add(f"{name}.npy", array)
            files[f"{name}.npy"] = sequences.file_hexdigest(f"{name}.npy", _npy_header(array))
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no temporary folder behind
        raise
    for name in files:
        sizes[name] = (tmp / name).stat().st_size
    entry = {
        "name": final.name,
        "index": shard.index,
        "n_tokens": len(shard),
        "n_sequences": shard.n_sequences,
        "n_scored": int(shard.scored.sum()),
        "first_sequence": int(shard.sequence_ids.min()),
        "last_sequence": int(shard.sequence_ids.max()),
        "files": files,
        "sizes": sizes,
        "file_digest": FILE_DIGEST,
        "sequence_digests": sequences.hexdigests(),
    }
    try:
        write_json(tmp / "shard.json", entry)
        with _shard_errors(final, shard.index):
            os.replace(tmp, final)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _shard_errors(path: Path, index: int):
    """OS errors while writing shard ``index`` name the file and say it is the capture's shard."""
    return storage_errors(path, f"capture shard {shard_name(index)}")


class ShardWriter:
    """Writes one shard as its batches arrive, with the same files and entry as :func:`write_shard`.

    Each hook's ``.npy`` gets its header first (the shape is known from the token count) and then
    each batch's rows, hashed as they are written: the shard's activations never sit in memory
    whole, nothing is concatenated, and no file is read back to hash it. ``finish`` checks every
    row arrived, writes the per-token columns and ``shard.json``, and renames the folder into place
    (atomic, like ``write_shard``); leaving the ``with`` block without ``finish`` closes the files,
    and on an error removes the temp folder (an interrupted or killed run leaves it, and the next
    attempt replaces it). OS errors (disk full, file-size limit) name the file and the shard.
    """

    def __init__(self, root: Path, index: int, hooks: tuple[str, ...] | list[str], n_tokens: int, d_model: int,
                 dtype, sequence_lengths=None) -> None:
        self.root, self.index, self.hooks = Path(root), index, tuple(hooks)
        self.n_tokens, self.d_model, self.dtype = int(n_tokens), int(d_model), np.dtype(dtype)
        lengths = [self.n_tokens] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != self.n_tokens:
            raise ValueError(f"sequence_lengths sum to {sum(lengths)}, but the shard has {self.n_tokens} tokens")
        self.sequences = SequenceDigests(lengths)
        shards_dir = self.root / "shards"
        shards_dir.mkdir(parents=True, exist_ok=True)
        self.final = shards_dir / shard_name(index)
        self.tmp = shards_dir / f".tmp-{shard_name(index)}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.rows = dict.fromkeys(self.hooks, 0)
        self.files = {}
        self.header = _npy_header(np.empty((0, self.d_model), self.dtype), shape=(self.n_tokens, self.d_model))
        try:
            with _shard_errors(self.tmp, index):
                self.tmp.mkdir()
            for hook in self.hooks:
                with _shard_errors(self.tmp / f"{hook}.npy", index):
                    handle = open(self.tmp / f"{hook}.npy", "wb")  # noqa: SIM115 - closed in finish/close
                self.files[hook] = handle
                self._write(hook, self.header)
        except Exception:
            self._discard()
            raise

    def _write(self, hook: str, data) -> None:
        with _shard_errors(self.tmp / f"{hook}.npy", self.index):
            self.files[hook].write(data)

    def _discard(self) -> None:
        """Close every file and remove the temp folder (after an error: nothing half-written stays)."""
        for handle in self.files.values():
            with contextlib.suppress(OSError):
                handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, hook: str, rows: np.ndarray) -> None:
        """Append ``rows`` (tokens x d_model, in the shard's dtype) to ``hook``'s file."""
        if rows.dtype != self.dtype or rows.ndim != 2 or rows.shape[1] != self.d_model:
            raise ValueError(f"{hook}: expected rows of ({self.d_model},) {self.dtype}, got {rows.shape} {rows.dtype}")
        if self.rows[hook] + len(rows) > self.n_tokens:
            raise ValueError(f"{hook}: more than the shard's {self.n_tokens} tokens were written")
        rows = np.ascontiguousarray(rows)
        self._write(hook, memoryview(rows).cast("B"))
        self.sequences.add(f"{hook}.npy", rows)
        self.rows[hook] += len(rows)

    def close(self) -> None:
        for hook, handle in self.files.items():
            with _shard_errors(self.tmp / f"{hook}.npy", self.index):
                handle.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, Exception):
            self._discard()
        else:  # finished, or interrupted (Ctrl-C): the temp folder stays until the resume replaces it
            self.close()

    def finish(self, columns: dict[str, np.ndarray]) -> dict:
        """Write the per-token columns and ``shard.json``, rename into place; return the entry."""
        short = {hook: n for hook, n in self.rows.items() if n != self.n_tokens}
        if short:
            raise ValueError(f"shard {self.index} expected {self.n_tokens} tokens per hook, got {short}")
        self.close()
        files = {}
        for name in COLUMNS:
            buffer = io.BytesIO()
            array = np.ascontiguousarray(columns[name], dtype=_COLUMN_DTYPES[name])
            self.sequences.add(f"{name}.npy", array)
            np.save(buffer, array)
            with _shard_errors(self.tmp / f"{name}.npy", self.index):
                (self.tmp / f"{name}.npy").write_bytes(buffer.getvalue())
            files[f"{name}.npy"] = self.sequences.file_hexdigest(f"{name}.npy", _npy_header(array))
        for hook in self.hooks:
            files[f"{hook}.npy"] = self.sequences.file_hexdigest(f"{hook}.npy", self.header)
        sizes = {name: (self.tmp / name).stat().st_size for name in files}
        sequence_ids = np.asarray(columns["sequence_ids"])
        entry = {
            "name": self.final.name,
            "index": self.index,
            "n_tokens": self.n_tokens,
            "n_sequences": len(np.unique(sequence_ids)),
            "n_scored": int(np.asarray(columns["scored"]).sum()),
            "first_sequence": int(sequence_ids.min()),
            "last_sequence": int(sequence_ids.max()),
            "files": files,
            "sizes": sizes,
            "file_digest": FILE_DIGEST,
            "sequence_digests": self.sequences.hexdigests(),
        }
        write_json(self.tmp / "shard.json", entry)
        with _shard_errors(self.final, self.index):
            os.replace(self.tmp, self.final)
        return entry


def _load_npy(file: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` with errors that name the file (a damaged capture is a clear error, not a traceback)."""
    try:
        return np.load(file, mmap_mode=mmap_mode)
    except FileNotFoundError:
        raise ValueError(f"capture file {file} is missing; the capture is damaged (recapture it)") from None
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"capture file {file} cannot be read ({error}); the capture is damaged (recapture it)"
        ) from None


def read_shard(folder: Path, hooks: list[str]) -> CaptureShard:
    if not (folder / "shard.json").exists():
        raise ValueError(f"capture shard {folder} is missing; the capture is damaged (recapture it)")
    entry = read_json(folder / "shard.json")
    columns = {name: _load_npy(folder / f"{name}.npy") for name in COLUMNS}
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
        entry = read_json(folder / "shard.json")
        out[int(entry["index"])] = entry
    return out


def content_hash(entries: list[dict]) -> str:
    """SHA-256 of the capture's data: its sequences' digests in order (see :class:`SequenceDigests`).

    The same inputs, model and options give the same hash whatever ``shard_size`` or number of
    ranks wrote them. Shards written before per-sequence digests existed hash their files instead.
    """
    digest = hashlib.sha256()
    ordered = sorted(entries, key=lambda e: e["index"])
    if all("sequence_digests" in entry for entry in ordered):
        for entry in ordered:
            for sequence in entry["sequence_digests"]:
                digest.update(f"{sequence}\n".encode())
        return digest.hexdigest()
    for entry in ordered:
        for name, sha in sorted(entry["files"].items()):
            digest.update(f"{entry['name']}/{name}:{sha}\n".encode())
    return digest.hexdigest()


def verify_capture(run: Capture, hooks: list[str] | None = None) -> None:
    """Check a capture folder against its manifest; raise ``ValueError`` naming the first bad file.

    Every shard folder must exist and every file must have its recorded size; the files a reader
    of ``hooks`` touches (the per-token columns and those hooks' activations; default: all) are
    re-hashed. Sizes catch truncated or zero-byte files for free; hashes catch changed bytes.
    """
    if run.path is None:
        return
    wanted = None if hooks is None else {f"{hook}.npy" for hook in hooks} | {f"{c}.npy" for c in COLUMNS}
    for entry in run.manifest["shards"]:
        folder = run.path / "shards" / entry["name"]
        if not folder.is_dir():
            raise ValueError(f"capture {run.path} is damaged: shard folder {folder} is missing")
        sizes = entry.get("sizes", {})
        lengths = None
        for name, sha in entry["files"].items():
            file = folder / name
            if not file.exists():
                raise ValueError(f"capture {run.path} is damaged: {file} is missing")
            size = file.stat().st_size
            if name in sizes and size != sizes[name]:
                raise ValueError(
                    f"capture {run.path} is damaged: {file} has {size} bytes, its manifest says {sizes[name]}"
                )
            if size == 0:
                raise ValueError(f"capture {run.path} is damaged: {file} is empty (0 bytes)")
            if wanted is not None and name not in wanted:
                continue
            if entry.get("file_digest") == FILE_DIGEST:
                if lengths is None:
                    lengths = _sequence_lengths(_load_npy(folder / "sequence_ids.npy"))
                actual = _file_digest(file, lengths)
            else:
                actual = _sha256(file)
            if actual != sha:
                raise ValueError(
                    f"capture {run.path} is damaged: {file} does not match its manifest hash "
                    "(changed after it was written); recapture it, or pass --no-verify to use it anyway"
                )


def load_capture(path: str | Path, verify: bool = False) -> Capture:
    """Open a capture folder written by ``capture(..., out_dir=path)``; data loads lazily.

    ``verify=True`` checks every shard's files against the manifest (sizes and hashes,
    :func:`verify_capture`) and raises ``ValueError`` naming the first damaged file.
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
    manifest = read_json(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has capture format {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    run = Capture(manifest, path=path)
    if verify:
        verify_capture(run)
    return run
