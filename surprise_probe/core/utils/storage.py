"""Writing files: atomic writes, OS errors that say what and where, and stale temporaries swept.

Every file the toolkit writes whole goes through :func:`write_atomic` (directly, or through
``jsonio.write_text``): the bytes go to a temporary sibling ``.<name>.tmp-<pid>``, are flushed to
disk and renamed into place, so a reader never sees half a file. If writing fails the temporary
is removed, and a temporary left by a process that was killed is removed the next time the same
file is written. Files written piece by piece (capture shards, the model cache) wrap their writes
in :func:`storage_errors`.

An OS error while writing (disk full, file-size limit, read-only or forbidden place) becomes a
:class:`StorageError`: one line naming the path, what the toolkit was writing and how to fix it.

>>> error = OSError(28, "No space left on device")
>>> str(storage_error(error, "/data/run/sweep.html", "the fit's figure"))
"could not write the fit's figure /data/run/sweep.html: no space left on the device; free space there (`df -h /data/run`) or write somewhere else"
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StorageError", "storage_error", "storage_errors", "write_atomic", "temporary_path",
           "sweep_temporaries", "pid_alive"]

# Why a write failed, by errno; anything else is not a storage problem and is left as it is.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the file-size limit (`ulimit -f`) or the file system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
    errno.EIO: "an input/output error (a failing disk or network file system?)",
}


class StorageError(OSError):
    """A write that failed for a reason of the place it writes to; ``str()`` is the whole message."""

    def __str__(self) -> str:
        return str(self.strerror)


def _fix(code: int, folder: Path, elsewhere: str) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free space there (`df -h {folder}`) or {elsewhere}"
    if code == errno.EFBIG:
        return f"raise the limit (`ulimit -f unlimited`) or {elsewhere}"
    if code == errno.EIO:
        return f"check the disk, or {elsewhere}"
    return elsewhere


def storage_error(error: OSError, path: str | Path, what: str = "", elsewhere: str = "write somewhere else",
                  doing: str = "write") -> StorageError:
    """``error`` as a :class:`StorageError` naming ``path``, ``what`` was being written, and the fix.

    ``elsewhere``: how to write somewhere else (e.g. ``set SURPRISE_PROBE_CACHE to ...``).
    """
    path = Path(path)
    reason = _REASONS.get(error.errno) or (error.strerror or str(error)).lower()
    folder = path.parent if path.name else path
    label = f"{what} {path}" if what else str(path)
    return StorageError(error.errno, f"could not {doing} {label}: {reason}; {_fix(error.errno, folder, elsewhere)}",
                        str(path))


@contextlib.contextmanager
def storage_errors(path: str | Path, what: str = "", elsewhere: str = "write somewhere else",
                   doing: str = "write") -> Iterator[None]:
    """Inside this block an OS error of the place written to becomes a :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        if error.errno not in _REASONS:
            raise
        raise storage_error(error, path, what, elsewhere, doing) from error


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_path(path: Path) -> Path:
    """The temporary sibling this process writes ``path`` through: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sweep_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by processes that no longer run; return them."""
    removed = []
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
            removed.append(stale)
    return removed


def write_atomic(path: str | Path, data: bytes | str, what: str = "", elsewhere: str = "write somewhere else") -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and ``os.replace``.

    Never half-written; on any failure the temporary is removed, and an OS error of the place is
    a :class:`StorageError` (see the module doc).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temporary_path(path)
    if path.parent.is_dir():
        sweep_temporaries(path)
    try:
        with storage_errors(path, what, elsewhere):
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
