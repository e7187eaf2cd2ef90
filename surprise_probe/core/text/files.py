"""Reading inputs: ``.txt`` / ``.jsonl`` files, prompts and pairs files, and the built-in data sets.

Every error names ``file:line`` and what was expected; nothing is skipped silently.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "in.jsonl"
>>> _ = path.write_text('{"text": "One."}\\n{"text": "Two.", "token_ids": [1, 2]}\\n')
>>> read_inputs(path)
Traceback (most recent call last):
ValueError: ...in.jsonl:2: has both 'text' and 'token_ids'; give exactly one of 'text', 'messages', 'token_ids'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from surprise_probe.core.text.chat import validate_messages
from surprise_probe.core.utils.jsonio import read_jsonl

__all__ = ["read_inputs", "read_items", "read_prompts", "read_pairs", "builtin_items", "builtin_prompts"]

_CONTENT_KEYS = ("text", "messages", "token_ids")


def _data_path(name: str) -> Path:
    return Path(str(resources.files("surprise_probe") / "data" / name))


def builtin_items() -> list[dict]:
    """The built-in conversations (prompt + human-written answer), written by the project."""
    return read_inputs(_data_path("builtin.jsonl"), keep_metadata=True)


def builtin_prompts() -> list[dict]:
    """Open-ended prompts with a topic label, for generation (``{"id", "topic", "prompt"}``)."""
    return read_prompts(_data_path("prompts.jsonl"))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; expected a file")


def read_item(value, where: str, keep_metadata: bool = False):
    """Validate one input value (text, a list of messages, or a dict with one content key)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: empty text; expected at least one non-whitespace character")
        return value
    if isinstance(value, list):
        return validate_messages(value, where)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, a list of messages or a string (one text), "
                         f"got {type(value).__name__}")
    present = [key for key in _CONTENT_KEYS if key in value]
    if len(present) > 1:
        raise ValueError(
            f"{where}: has both {present[0]!r} and {present[1]!r}; give exactly one of 'text', 'messages', 'token_ids'"
        )
    if not present:
        raise ValueError(f"{where}: expected a 'text', 'messages' or 'token_ids' key, got keys {sorted(value)}")
    if "messages" in value:
        value = {**value, "messages": validate_messages(value["messages"], where)}
    elif "text" in value:
        if not isinstance(value["text"], str) or not value["text"].strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {value['text']!r:.60}")
    else:
        ids = value["token_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ValueError(f"{where}: 'token_ids' must be a non-empty list of integers, got {ids!r:.60}")
        if "scored" in value:
            scored = value["scored"]
            if not isinstance(scored, list) or len(scored) != len(ids) or not all(isinstance(s, bool) for s in scored):
                raise ValueError(
                    f"{where}: 'scored' must be a list of {len(ids)} booleans (one per token id)"
                )
    return value if keep_metadata else _strip(value)


def read_inputs(path: str | Path, keep_metadata: bool = False) -> list:
    """Read inputs from a ``.txt`` or ``.jsonl`` file.

    ``.txt``: if the file has a blank line, each blank-line-separated block is one text;
    otherwise each non-empty line is one text. ``.jsonl``: one JSON value per line, either a
    string (one text, as ``{"text": ...}``), a list of messages, or an object with exactly one of
    ``text``, ``messages`` or ``token_ids`` (and an optional ``scored``). With ``keep_metadata`` the whole objects are returned (extra keys such
    as ``id`` kept).
    """
    path = Path(path)
    if path.name == "builtin":
        return builtin_items()
    _check_file(path, "input")
    if path.suffix == ".txt":
        text = _read_text(path)
        if any(not line.strip() for line in text.strip().splitlines()):
            items = [block.strip() for block in text.split("\n\n") if block.strip()]
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
        if not items:
            raise ValueError(f"{path} holds no text")
        return items
    if path.suffix != ".jsonl":
        raise ValueError(f"input file {path} must end in .txt or .jsonl, got {path.suffix!r}")
    items = [read_item(value, f"{path}:{number}", keep_metadata) for number, value in read_jsonl(path)]
    if not items:
        raise ValueError(f"{path} holds no inputs")
    return items


def read_items(spec: str | Path, keep_metadata: bool = False) -> list:
    """``"builtin"`` (the built-in conversations) or a ``.txt`` / ``.jsonl`` file of inputs."""
    if str(spec) == "builtin":
        return builtin_items() if keep_metadata else [_strip(item) for item in builtin_items()]
    return read_inputs(spec, keep_metadata=keep_metadata)


def read_prompts(spec: str | Path) -> list[dict]:
    """``"builtin"`` or a ``.jsonl`` of ``{"id": str, "prompt": str, ...}`` objects (ids unique)."""
    if str(spec) == "builtin":
        return builtin_prompts()
    path = Path(spec)
    _check_file(path, "prompts")
    prompts, seen = [], {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or not {"id", "prompt"} <= set(record):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: expected an object with 'id' and 'prompt', got {got}")
        if not isinstance(record["id"], str) or not record["id"]:
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {record['id']!r}")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {record['prompt']!r:.60}")
        if record["id"] in seen:
            raise ValueError(f"{where}: id {record['id']!r} already used on line {seen[record['id']]}")
        seen[record["id"]] = number
        prompts.append(record)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts; expected {{\"id\", \"prompt\"}} lines")
    return prompts


def read_pairs(path: str | Path) -> list[tuple]:
    """Read ``{"source": item, "destination": item}`` lines; items as in ``--input`` files."""
    path = Path(path)
    _check_file(path, "pairs")
    if path.suffix != ".jsonl":
        raise ValueError(f"pairs file {path} must end in .jsonl, got {path.suffix!r}")
    pairs = []
    for number, value in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(value, dict) or "source" not in value or "destination" not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where}: expected an object with 'source' and 'destination', got {keys}")
        pairs.append((read_item(value["source"], f"{where} (source)"),
                      read_item(value["destination"], f"{where} (destination)")))
    if not pairs:
        raise ValueError(f"pairs file {path} holds no pairs")
    return pairs


def _strip(value):
    if not isinstance(value, dict):
        return value
    keep = ("text", "messages", "token_ids", "scored")
    return {key: value[key] for key in keep if key in value}
