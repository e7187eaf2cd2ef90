"""Output folders that never lose data: ownership, config-matched resume, and a writer lock.

Every folder (or file) the toolkit writes results into goes through :func:`claim_output`:

- a path that exists as the wrong kind (a file where a folder is expected, or the reverse) or
  that is not writable is refused before any work starts;
- a folder holding files the toolkit did not write is refused, even with ``overwrite`` (nothing
  the user owns is ever deleted); an empty folder is fine;
- a folder written by the same step with the same settings is reused (resume / already done);
  with other settings it is refused, naming the first setting that differs, unless
  ``overwrite=True``, which removes only what the toolkit wrote there (the record lists its
  outputs; files and folders the user added beside them stay, and are never counted as
  outputs); a folder holding only the
  record of an unfinished run of the same step (it stopped before writing anything, e.g. on a
  bad ``--device``) is claimed afresh with the new settings;
- a lock file (``.lock``: pid, host, start time) keeps a second writer out; a lock left by a
  process that no longer exists on this host is cleared.

The record of what produced a folder is ``<folder>/config.json``:
``{"command": ..., "config": {...}, "software_versions": {...}}``; for a single output file it is
``<file>.config.json``. The same file reruns the command: ``surprise-probe <command> --config
<folder>/config.json``.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp()) / "out"
>>> with claim_output(folder, "demo", {"n": 1}) as claim:
...     claim.resumed, claim.finish().name
(False, 'config.json')
>>> with claim_output(folder, "demo", {"n": 1}) as claim:
...     claim.resumed, claim.finished
(True, True)
>>> with claim_output(folder, "demo", {"n": 2}) as claim:   # doctest: +ELLIPSIS
...     pass
Traceback (most recent call last):
FileExistsError: refusing to write into ...: it holds a demo run with n=1, not n=2; ...
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surprise_probe.core.utils.jsonio import (
    finite_or_none,
    read_json,
    software_versions,
    write_json,
)
from surprise_probe.core.utils.storage import pid_alive, storage_errors

__all__ = [
    "claim_output",
    "OutputClaim",
    "FolderLocked",
    "folder_lock",
    "config_record_path",
    "first_difference",
    "check_writable_target",
]

LOCK_NAME = ".lock"
RECORD_NAME = "config.json"


class FolderLocked(RuntimeError):
    """Another live process is writing into the folder."""


def config_record_path(path: Path, is_file: bool) -> Path:
    """Where the record of the producing command lives for an output folder or file."""
    return path.with_name(path.name + ".config.json") if is_file else path / RECORD_NAME


_held: dict[Path, int] = {}


@contextlib.contextmanager
def folder_lock(lock_path: str | Path) -> Iterator[Path]:
    """Hold ``lock_path`` (created exclusively, holding pid and host) for the block.

    Reentrant within one process. A lock whose process is gone (same host, pid not running) is
    stale and is replaced; a live one raises :class:`FolderLocked` naming its pid and host.
    """
    lock_path = Path(lock_path).absolute()
    if lock_path in _held:
        _held[lock_path] += 1
        try:
            yield lock_path
        finally:
            _held[lock_path] -= 1
        return
    host = socket.gethostname()
    payload = f'{{"pid": {os.getpid()}, "host": "{host}", "started": {time.time():.0f}}}\n'
    for _attempt in range(3):
        try:
            with storage_errors(lock_path, "the output's lock"):
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = read_json(lock_path)
            except (ValueError, FileNotFoundError):
                owner = {}
            pid, owner_host = owner.get("pid"), owner.get("host")
            if owner_host == host and isinstance(pid, int) and not pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()  # stale: its process is gone
                continue
            if not owner:  # being written this instant, or damaged: give the writer a moment
                time.sleep(0.2)
                if lock_path.exists() and time.time() - lock_path.stat().st_mtime > 5:
                    lock_path.unlink()
                continue
            raise FolderLocked(
                f"{lock_path.parent} is being written by another run (pid {pid} on host {owner_host}); "
                f"wait for it to finish, or delete {lock_path} if that process is gone"
            ) from None
        try:
            with storage_errors(lock_path, "the output's lock"), os.fdopen(fd, "w") as handle:
                handle.write(payload)
        except OSError:
            lock_path.unlink(missing_ok=True)
            raise
        break
    else:
        raise FolderLocked(f"could not take the lock {lock_path}; another run keeps taking it")
    _held[lock_path] = 1
    try:
        yield lock_path
    finally:
        _held.pop(lock_path, None)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()


# Recorded, but not a setting of the result: a finished or half-done folder that was moved or
# copied resumes under its new name.
NOT_COMPARED = {"out"}


def first_difference(recorded: dict, wanted: dict) -> str | None:
    """The first setting (sorted by name) whose value differs, as ``name=old, not name=new``.

    ``out`` (where the result is) is not compared.
    """
    recorded, wanted = finite_or_none(recorded), finite_or_none(wanted)
    for key in sorted((set(recorded) | set(wanted)) - NOT_COMPARED):
        if recorded.get(key) != wanted.get(key):
            return f"{key}={recorded.get(key)!r}, not {key}={wanted.get(key)!r}"
    return None


def _fmt(difference: str) -> str:
    old, new = difference.split(", not ")
    return f"{old.replace(chr(39), '')}, not {new.replace(chr(39), '')}"


def check_writable_target(path: Path, is_file: bool) -> None:
    """Refuse (``ValueError``) a target of the wrong kind or one that cannot be written."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--out {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                         "remove the link or give the folder it should point to")
    if is_file:
        if path.is_dir():
            raise ValueError(f"--out {path} is a folder; expected a file path")
        parent = path.parent
    else:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; expected a folder (new or written by surprise-probe)")
        parent = path
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {probe} is not writable")


@dataclass
class OutputClaim:
    """What :func:`claim_output` found: the path, and whether it holds this step's earlier work."""

    path: Path
    command: str
    config: dict
    resumed: bool  # the same step with the same settings wrote here before
    finished: bool  # ... and finished (its result is complete)
    record: Path
    # Entries of the folder that the user put there (present before this step wrote its outputs):
    # never outputs, never removed by --overwrite.
    foreign: tuple[str, ...] = ()

    def write_record(self, finished: bool = False, extra: dict | None = None) -> Path:
        """(Re)write the producing command's record (config, software versions, ``extra``)."""
        payload = {"command": self.command, "config": self.config, "finished": finished,
                   "software_versions": software_versions()}
        if self.foreign:
            payload["foreign"] = list(self.foreign)
        payload.update(extra or {})
        return write_json(self.record, payload)

    def finish(self, extra: dict | None = None) -> Path:
        """Mark the result complete (a rerun with the same settings then skips the work).

        The record lists the outputs present now (not the user's own entries); a rerun that finds
        one missing redoes the work, and ``--overwrite`` removes exactly those.
        """
        self.finished = True
        if self.path.is_dir():
            skip = {LOCK_NAME, self.record.name, *self.foreign}
            outputs = sorted(e.name for e in self.path.iterdir() if e.name not in skip)
        else:
            outputs = [self.path.name] if self.path.exists() else []
        return self.write_record(True, {"outputs": outputs, **(extra or {})})


def _ours(entry: Path, kinds: tuple[str, ...]) -> bool:
    return entry.name in kinds or entry.name.startswith(".")


@contextlib.contextmanager
def claim_output(
    path: str | Path,
    command: str,
    config: dict,
    *,
    overwrite: bool = False,
    is_file: bool = False,
    owned_names: tuple[str, ...] = (),
    check_config: bool = True,
) -> Iterator[OutputClaim]:
    """Check, lock and (when new) create the output ``path`` of ``command`` run with ``config``.

    ``owned_names``: entries a folder written by an older version may hold without a record
    (e.g. ``run.json`` of a capture); such a folder counts as the toolkit's. ``check_config=False``:
    only ownership is checked (for a folder whose parts check their own settings, e.g. a study).
    See the module doc.
    """
    path = Path(path)
    check_writable_target(path, is_file)
    record = config_record_path(path, is_file)
    config = finite_or_none(config)
    if is_file:
        with storage_errors(path.parent, "the output folder", doing="create"):
            path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
    else:
        with storage_errors(path, "the output folder", doing="create"):
            path.mkdir(parents=True, exist_ok=True)
        lock = path / LOCK_NAME
    with folder_lock(lock):
        resumed = finished = False
        foreign: tuple[str, ...] = ()
        present = path.exists() and (path.stat().st_size > 0 if is_file else
                                     any(e.name != LOCK_NAME for e in path.iterdir()))
        if present and not is_file and _only_an_unfinished_claim(path, record, command):
            present = False  # a run of this step that stopped before writing anything: nothing to keep
        if present:
            existing = None
            if record.exists():
                with contextlib.suppress(ValueError):
                    existing = read_json(record)
            ours = isinstance(existing, dict) and existing.get("command") == command
            legacy = not is_file and existing is None and any(
                (path / name).exists() for name in owned_names)
            if ours and not is_file:
                foreign = _foreign_entries(path, record, existing)
            if not ours and not legacy:
                what = "file" if is_file else "folder"
                other = (f"a {existing.get('command')} run" if isinstance(existing, dict) and existing.get("command")
                         else f"files surprise-probe {command} did not write")
                raise FileExistsError(
                    f"refusing to write into {path}: the {what} holds {other}; choose a new "
                    f"{'file' if is_file else 'folder'} (nothing there is deleted, even with --overwrite)"
                )
            difference = None
            if check_config and not legacy:
                difference = first_difference(existing.get("config", {}), config)
            if difference is None and (not legacy or not check_config):
                resumed = True
                finished = bool(existing.get("finished")) if isinstance(existing, dict) else False
                # A finished record whose outputs were removed since is not finished: resume and redo.
                if finished and not all((path.parent if is_file else path).joinpath(name).exists()
                                        for name in existing.get("outputs", [])):
                    finished = False
            elif not overwrite:
                article = "an" if command[:1] in "aeiou" else "a"
                why = (f"it holds {article} {command} run with {_fmt(difference)}" if difference
                       else f"it holds {article} {command} run from an older version with no recorded settings")
                raise FileExistsError(
                    f"refusing to write into {path}: {why}; use the same settings to resume, "
                    "another --out, or --overwrite to recompute"
                )
            else:
                _clear(path, is_file, record, keep=foreign)
        claim = OutputClaim(path, command, config, resumed, finished, record, foreign)
        if not resumed:
            claim.write_record()  # first, so an interrupted run is recognised and resumed
        yield claim


def _only_an_unfinished_claim(path: Path, record: Path, command: str) -> bool:
    if any(entry.name not in (LOCK_NAME, record.name) for entry in path.iterdir()):
        return False
    try:
        existing = read_json(record)
    except (ValueError, OSError):
        return False
    return isinstance(existing, dict) and existing.get("command") == command and not existing.get("finished")


def _foreign_entries(path: Path, record: Path, existing: dict) -> tuple[str, ...]:
    """The entries of ``path`` the user put there, next to the outputs its record lists.

    A finished record lists its outputs: everything else (but the record, the lock and our own
    hidden temporaries) is the user's. An unfinished one has no list yet: what its claim found
    there (``foreign`` in the record) is the user's.
    """
    own = {LOCK_NAME, record.name}
    known = set(existing.get("foreign", []))
    outputs = existing.get("outputs")
    if existing.get("finished") and isinstance(outputs, list):
        own.update(outputs)
        return tuple(sorted(e.name for e in path.iterdir()
                            if e.name not in own and not e.name.startswith(".tmp")))
    return tuple(sorted(name for name in known if (path / name).exists() or (path / name).is_symlink()))


def _clear(path: Path, is_file: bool, record: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what an earlier run of the same command wrote; the lock and ``keep`` (the user's) stay."""
    if is_file:
        path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        return
    for entry in path.iterdir():
        if entry.name == LOCK_NAME or entry.name in keep:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise
