"""Writers: every model samples its own responses (on-policy; the exact sampled ids are kept).

Sampling goes through the toolkit's one sampler and is resumable: a ``.jsonl`` store keeps every
finished batch (written whole through :func:`surprise_probe.core.utils.jsonio.write_jsonl`) beside
a ``.config.json`` of the settings it was sampled with, and a rerun with other settings is refused
unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surprise_probe.analyses.policy.prompts import GapPrompt, prefix_ids
from surprise_probe.core.forward.sampling import decoding_layout, sample
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.utils.jsonio import (
    read_json,
    read_jsonl,
    software_versions,
    write_json,
    write_jsonl,
)
from surprise_probe.core.utils.progress import tqdm

__all__ = ["WriterResponse", "sample_writer"]


@dataclass(frozen=True)
class WriterResponse:
    writer: str
    prompt_index: int
    prompt_id: str
    sample_index: int
    format: str  # the format it was sampled in
    content_ids: list[int]  # exact sampled ids, stop id removed
    ended: bool
    text: str


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _open_store(store: Path, config: dict, overwrite: bool) -> dict[tuple[str, int], dict]:
    """The records ``store`` already holds for ``config`` (none after ``overwrite``); records the config."""
    store.parent.mkdir(parents=True, exist_ok=True)
    record_path = store.with_name(store.name + ".config.json")
    done: dict[tuple[str, int], dict] = {}
    if store.exists() or record_path.exists():
        if not record_path.exists():
            raise FileExistsError(f"{store} exists but was not written by the gap analysis; choose another --out")
        previous = read_json(record_path).get("config")
        if previous != config and not overwrite:
            diff = next(k for k in sorted(set(config) | set(previous or {}))
                        if (previous or {}).get(k) != config.get(k))
            raise FileExistsError(
                f"{store} holds responses sampled with {diff}={(previous or {}).get(diff)!r}, not "
                f"{config.get(diff)!r}; use the same settings to resume, or --overwrite"
            )
        if previous == config and store.exists():
            for _, record in read_jsonl(store):
                done[(record["prompt_id"], record["sample_index"])] = record
    write_json(record_path, {"config": config, "config_hash": _config_hash(config),
                             "software_versions": software_versions()})
    return done


def sample_writer(
    model,
    name: str,
    prompts: Sequence[GapPrompt],
    *,
    fmt: str,
    n_samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    store: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[WriterResponse]:
    """Sample ``n_samples`` responses per prompt in format ``fmt``; resumable through ``store``.

    ``store`` (a ``.jsonl`` path) keeps every finished batch; a rerun with the same settings and
    prompts reuses what is there and samples only the rest (the sampler seeds each row from the
    prompt's ids, so the resumed result equals an uninterrupted one). Other settings are refused
    unless ``overwrite``.
    """
    config = {
        "writer": name, "model_id": model_id(model), "format": fmt, "n_samples": n_samples,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
    }
    done: dict[tuple[str, int], dict] = {}
    if store is not None:
        store = Path(store)
        done = _open_store(store, config, overwrite)
    wanted = {p.id for p in prompts}
    kept = [r for key, r in done.items() if key[0] in wanted]
    todo = [i for i, p in enumerate(prompts) if any((p.id, j) not in done for j in range(n_samples))]
    prefixes = {i: prefix_ids(model, prompts[i].prompt, fmt) for i in todo}
    n_ctx = int(model.cfg.n_ctx)
    for i, ids in prefixes.items():
        if len(ids) + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt {prompts[i].id!r} is {len(ids)} tokens in {name}'s {fmt} format; with max_new_tokens "
                f"{max_new_tokens} that exceeds its context of {n_ctx} tokens (shorten or drop that prompt, or "
                "lower --max-new-tokens)"
            )
    chunk_prompts = max(1, batch_size // n_samples)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"sample {name}", unit="prompt",
               disable=not progress)
    # One weight relayout for every chunk (sampling's decoding_layout is re-entrant): each chunk is
    # its own sample call, so that an interrupted run keeps what it drew.
    with decoding_layout(model):
        for start in range(0, len(todo), chunk_prompts):
            chunk = todo[start : start + chunk_prompts]
            drawn = sample(model, [prefixes[i] for i in chunk], n_samples=n_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, batch_size=batch_size)
            for item in drawn:
                prompt = prompts[chunk[item.prompt_index]]
                key = (prompt.id, item.sample_index)
                if key in done:
                    continue
                record = {"prompt_id": prompt.id, "sample_index": item.sample_index, "format": fmt,
                          "prefix_ids": item.prompt_ids, "content_ids": item.content_ids, "ended": item.ended,
                          "text": item.text(model.tokenizer)}
                done[key] = record
                kept.append(record)
            if store is not None:
                write_jsonl(store, kept)
            bar.update(len(chunk))
    bar.close()
    index = {p.id: i for i, p in enumerate(prompts)}
    out = [
        WriterResponse(name, index[r["prompt_id"]], r["prompt_id"], r["sample_index"], r["format"],
                       list(r["content_ids"]), bool(r["ended"]), r["text"])
        for r in done.values() if r["prompt_id"] in wanted and r["sample_index"] < n_samples
    ]
    return sorted(out, key=lambda r: (r.prompt_index, r.sample_index))
