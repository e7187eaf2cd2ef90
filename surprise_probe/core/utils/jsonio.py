"""The project's one JSON writer, one JSONL reader and one software-versions record.

Every JSON file the toolkit writes goes through :func:`write_json`: strict JSON (``NaN`` and
``inf`` become ``null``, so any parser reads it), written to a temporary file and renamed into
place (never half-written). Every ``.jsonl`` input goes through :func:`read_jsonl`, whose errors
name ``file:line``.

>>> to_json({"r2": float("nan"), "n": np.int64(3)})
'{\\n  "n": 3,\\n  "r2": null\\n}'
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["to_json", "write_json", "write_jsonl", "write_text", "read_json", "read_jsonl", "software_versions",
           "finite_or_none"]


def finite_or_none(value):
    """A copy of ``value`` with numpy types made plain and non-finite floats made ``None``."""
    if isinstance(value, dict):
        return {str(key): finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(payload) -> str:
    """Strict JSON text (``NaN``/``inf`` -> ``null``, numpy and paths made plain), keys sorted."""
    return json.dumps(finite_or_none(payload), indent=2, sort_keys=True, allow_nan=False)


def write_json(path: str | Path, payload) -> Path:
    """Write strict JSON to ``path`` through a temporary file and ``os.replace``."""
    return write_text(path, to_json(payload) + "\n")


def write_jsonl(path: str | Path, records) -> Path:
    """Write one compact JSON object per line (keys in their given order) through :func:`write_text`.

    The whole file is rewritten each time, so a kill never leaves half a line. A non-finite float
    is an error here, not ``null``: a resumable store must read back exactly what was written.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_jsonl(Path(folder) / "rows.jsonl", [{"id": "a", "n": 1}, {"id": "b", "n": 2}])
    ...     path.read_text()
    '{"id": "a", "n": 1}\\n{"id": "b", "n": 2}\\n'
    """
    return write_text(path, "".join(json.dumps(record, allow_nan=False) + "\n" for record in records))


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict:
    """Read a JSON file, naming the file in any error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, value)`` for every non-blank line of a ``.jsonl`` file.

    Errors name ``file:line``: invalid UTF-8, invalid JSON. A line is never skipped silently.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a .jsonl file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})"
                ) from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None


def software_versions() -> dict[str, str]:
    """Versions of the software that produced a result (recorded beside every result)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        # transformer_lens has no __version__ attribute; the distribution metadata has it.
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "surprise_probe": installed("surprise-probe"),
        "torch": installed("torch"),
        "transformer_lens": installed("transformer_lens"),
        "transformers": installed("transformers"),
        "numpy": np.__version__,
        "scikit-learn": installed("scikit-learn"),
        "python": platform.python_version(),
    }
