"""The project's one JSON writer, one JSONL writer and reader, and one software-versions record.

Every JSON file the toolkit writes goes through :func:`write_json`: strict JSON (``NaN`` and
``inf`` become ``null``, so any parser reads it), written to a temporary file and renamed into
place (never half-written). Every ``.jsonl`` file it writes goes through :func:`write_jsonl` (one
compact object per line, same temporary file and rename), and every ``.jsonl`` input through
:func:`read_jsonl`, whose errors name ``file:line``.

>>> to_json({"r2": float("nan"), "n": np.int64(3)})
'{\\n  "n": 3,\\n  "r2": null\\n}'
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from surprise_probe.core.utils.storage import write_atomic

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
    """Write UTF-8 ``text`` through a temporary file and ``os.replace`` (never half-written).

    A failed write leaves no temporary behind, and a disk-full, file-size or permission error
    names the path and the fix (:func:`surprise_probe.core.utils.storage.write_atomic`).
    """
    return write_atomic(path, text)


def read_json(path: str | Path) -> dict:
    """Read a JSON file, naming the file in any error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | Path, on_damaged: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, value)`` for every non-blank line of a ``.jsonl`` file.

    Errors name ``file:line``: invalid UTF-8, invalid JSON. A line is never skipped silently: a
    damaged line is an error, or, given ``on_damaged``, is passed to it as ``(line_number,
    problem)`` and skipped (for a store that recomputes what it cannot read).
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
                problem = f"not UTF-8 text ({error.reason} at byte {error.start})"
            else:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    problem = f"not valid JSON ({_json_problem(line, error)})"
                else:
                    yield number, value
                    continue
            if on_damaged is None:
                raise ValueError(f"{path}:{number}: {problem}")
            on_damaged(number, problem)


def _json_problem(line: str, error: json.JSONDecodeError) -> str:
    """What is wrong with a line, at the column where it is wrong; a line that stops before its
    value is complete (cut off) is said to end there, not reported at the next line's column 1."""
    text = line.rstrip("\r\n")
    try:
        json.loads(text)
    except json.JSONDecodeError as inner:
        error = inner
    if error.msg.startswith("Unterminated string"):
        return (f"the line stops after column {len(text)}, inside a string that opens at column {error.colno}; "
                "was it cut off?")
    if error.pos >= len(text.rstrip()):
        return (f"the line stops after column {len(text)}, before its JSON value is complete ({error.msg}); "
                "was it cut off?")
    return f"{error.msg} at column {error.colno}"


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
