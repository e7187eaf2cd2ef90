"""Reading input files (.txt, .jsonl) and the built-in data sets; writing run outputs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from surprise_probe.chat import validate_messages

__all__ = ["read_inputs", "builtin_items", "builtin_prompts"]


def _data_path(name: str) -> Path:
    return Path(str(resources.files("surprise_probe") / "data" / name))


def builtin_items() -> list[dict]:
    """The built-in conversations (prompt + human-written answer), written by the project."""
    return read_inputs(_data_path("builtin.jsonl"), keep_metadata=True)


def builtin_prompts() -> list[dict]:
    """Open-ended prompts with a topic label, for generation (``{"id", "topic", "prompt"}``)."""
    path = _data_path("prompts.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_inputs(path: str | Path, keep_metadata: bool = False) -> list:
    """Read inputs from a ``.txt`` or ``.jsonl`` file.

    ``.txt``: if the file has a blank line, each blank-line-separated block is one text;
    otherwise each non-empty line is one text. ``.jsonl``: one JSON value per line, either a list
    of messages or an object with ``text``, ``messages`` or ``token_ids`` (and optional ``scored``).
    With ``keep_metadata`` the whole objects are returned (extra keys such as ``id`` kept).
    """
    path = Path(path)
    if path.name == "builtin":
        return builtin_items()
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        if any(not line.strip() for line in text.strip().splitlines()):
            items = [block.strip() for block in text.split("\n\n") if block.strip()]
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
        if not items:
            raise ValueError(f"{path} holds no text")
        return items
    if path.suffix != ".jsonl":
        raise ValueError(f"input file {path} must end in .txt or .jsonl, got {path.suffix!r}")
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if isinstance(value, list):
            items.append(validate_messages(value, where))
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object or a list of messages, got {type(value).__name__}")
        if "messages" in value:
            value = {**value, "messages": validate_messages(value["messages"], where)}
        elif "text" in value:
            if not isinstance(value["text"], str) or not value["text"].strip():
                raise ValueError(f"{where}: 'text' must be a non-empty string")
        elif "token_ids" in value:
            if not isinstance(value["token_ids"], list) or not all(isinstance(t, int) for t in value["token_ids"]):
                raise ValueError(f"{where}: 'token_ids' must be a list of integers")
        else:
            raise ValueError(f"{where}: expected a 'text', 'messages' or 'token_ids' key, got keys {sorted(value)}")
        items.append(value if keep_metadata else _strip(value))
    if not items:
        raise ValueError(f"{path} holds no inputs")
    return items


def _strip(value: dict) -> dict:
    keep = ("text", "messages", "token_ids", "scored")
    return {key: value[key] for key in keep if key in value}
