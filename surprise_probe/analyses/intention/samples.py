"""Sampled responses as records (text, token ids, topic label) and their cache on disk.

Each sampling stage of a model (``k0``, ``commit_k<k>``, ``prefill``) is one JSON file, reused by a
rerun whose key (model, prompt format, prompts, sampling settings) matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from surprise_probe.analyses.intention.config import IntentionConfig
from surprise_probe.analyses.intention.prompts import IntentionPrompt
from surprise_probe.core.forward.sampling import Sampled
from surprise_probe.core.utils.jsonio import read_json, write_json

# Settings that do not change the samples (only what is computed from them): left out of the key.
_NOT_IN_KEY = ("n_boot", "level", "n_folds", "n_shuffles", "batch_size")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Cache:
    """Finished sampling stages of one model, one JSON file each, reused when their key matches."""

    def __init__(self, folder: Path | None, key: dict):
        self.folder, self.key = folder, _hash(key)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def get(self, stage: str):
        if self.folder is None or not (self.folder / f"{stage}.json").exists():
            return None
        stored = read_json(self.folder / f"{stage}.json")
        return stored["data"] if stored.get("key") == self.key else None

    def put(self, stage: str, data) -> None:
        if self.folder is not None:
            write_json(self.folder / f"{stage}.json", {"key": self.key, "stage": stage, "data": data})


def _model_cache(root: Path | None, name: str, prompt_format: str, prompts: Sequence[IntentionPrompt],
                 config: IntentionConfig) -> _Cache:
    """The cache of one model's stages under ``root/<model>`` (none without ``root``)."""
    return _Cache(None if root is None else root / _slug(name), {
        "model": name, "format": prompt_format, "prompts": [p.to_dict() for p in prompts],
        **{k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY},
    })


def _sample_records(model, samples: Sequence[Sampled], labeller_of, prefix_of=None) -> list[dict]:
    records = []
    for s in samples:
        prefix = [] if prefix_of is None else prefix_of(s)
        text = model.tokenizer.decode([*prefix, *s.content_ids])
        label = labeller_of(s)(text)
        records.append({"row": s.prompt_index, "sample": s.sample_index, "response_ids": s.response_ids,
                        "ended": s.ended, "text": text, "label": label.to_dict()})
    return records


def _label_of(record: dict) -> str:
    return record["label"]["label"]


def _content(record: dict) -> list[int]:
    return record["response_ids"][:-1] if record["ended"] else list(record["response_ids"])


def _reference(records: list[dict], modal_topic: str | None) -> dict:
    """The first sample naming the modal topic (else the first sample): the revealed response."""
    for r in records:
        if modal_topic is not None and _label_of(r) == modal_topic:
            return r
    return records[0]
