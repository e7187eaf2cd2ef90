"""Sample responses from a model and keep the sampled token ids (for on-policy reads).

Re-tokenizing sampled text is not the identity (MODELS.md: 9 of 32 SmolLM2 responses changed), so
every response is stored as the exact ids of prompt + sampled tokens, with the scored mask on the
sampled tokens. Reading that item back is an on-policy read.

Sampling itself is the toolkit's one sampler, :func:`surprise_probe.core.forward.sampling.sample`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from surprise_probe.core.forward.sampling import chat_prompt_ids, sample
from surprise_probe.core.utils.jsonio import read_jsonl, write_text
from surprise_probe.core.utils.outputs import claim_output
from surprise_probe.core.utils.progress import tqdm

__all__ = ["sample_responses", "generate_to_jsonl", "read_responses"]


@torch.inference_mode()
def sample_responses(
    model,
    prompts: Sequence,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    chat: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Sample one response per prompt; return ``{"token_ids", "scored", "prompt_len", "text", "ended"}`` items.

    ``prompts`` are user messages (strings) or full conversations; with ``chat=True`` they are
    rendered with the chat template plus the assistant header. Generation stops at the model's
    end-of-turn token, which is kept in the ids but not scored. Sampling is
    :func:`surprise_probe.core.forward.sampling.sample` (batched, KV-cached, seeded per prompt).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat:
            encoded.append(chat_prompt_ids(model, prompt))
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} must be non-empty text, got {prompt!r:.60}")
            encoded.append(list(model.tokenizer(prompt)["input_ids"]))
    sampled = sample(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_size=max(1, len(encoded)), progress=progress)
    return [
        {
            "token_ids": item.token_ids,
            "scored": item.scored,
            "prompt_len": len(item.prompt_ids),
            "text": item.text(model.tokenizer),
            "ended": item.ended,
        }
        for item in sampled
    ]


def _record_problem(record) -> str | None:
    """Why a parsed line is not a whole response record (None when it is one)."""
    if not isinstance(record, dict):
        return f"holds a {type(record).__name__}, not a response object"
    ids, scored = record.get("token_ids"), record.get("scored")
    if not isinstance(record.get("id"), str) or not record["id"]:
        return "has no 'id'"
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        return "has no list of integer 'token_ids'"
    if not isinstance(scored, list) or len(scored) != len(ids):
        return f"its 'scored' does not have one entry per token id ({len(ids)})"
    if not isinstance(record.get("messages"), list):
        return "has no 'messages'"
    return None


def read_responses(path: str | Path, ids) -> tuple[list[dict], list[tuple[int, str]]]:
    """The whole response records of a ``generate`` output file, and ``(line, problem)`` of each damaged line.

    A line that is not valid JSON, not a whole record, or repeats an id is damaged (its response
    is to be sampled again, and it is not counted). A whole record whose id is not among ``ids``
    is an error: the file belongs to other prompts.
    """
    path = Path(path)
    wanted = set(ids)
    records, damaged, seen = [], [], {}
    for number, record in read_jsonl(path, on_damaged=lambda number, problem: damaged.append((number, problem))):
        problem = _record_problem(record)
        if problem is None and record["id"] not in wanted:
            raise ValueError(
                f"{path}:{number}: holds id {record['id']!r}, which is not among the prompts of this run; "
                "use the same prompts to resume, or another --out"
            )
        if problem is None and record["id"] in seen:
            problem = f"repeats id {record['id']!r} of line {seen[record['id']]}"
        if problem is not None:
            damaged.append((number, problem))
            continue
        seen[record["id"]] = number
        records.append(record)
    return records, sorted(damaged)


def generate_to_jsonl(
    model,
    prompts: Sequence[dict],
    out_file: str | Path,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    record_config: dict | None = None,
    progress: bool = True,
    on_damaged_line: Callable[[str], None] | None = None,
) -> Path:
    """Sample a response per ``{"id", "prompt", ...}`` and add each batch to ``out_file``.

    Each line keeps the prompt's fields plus ``token_ids``/``scored`` (the on-policy ids) and
    ``messages`` (the decoded text, for reading by other models). The settings are recorded in
    ``<out_file>.config.json``; a rerun with the same settings resumes (ids already written are
    skipped), with other settings it is refused naming the setting (``overwrite=True`` starts
    over). A file this function did not write is never touched. A line it cannot read on resume
    (cut off, not a whole record) is reported, never silently: ``on_damaged_line`` gets one
    ``"file:line: problem; ..."`` note per such line (default: a ``UserWarning``), the line is
    dropped and its response sampled again. Each batch is written by replacing the whole file
    atomically, so a kill never leaves half a line. Each batch's seed derives from ``seed`` and
    its first id.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("generate_to_jsonl got no prompts")
    ids = [p.get("id") if isinstance(p, dict) else None for p in prompts]
    bad = next((i for i, v in enumerate(ids) if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise ValueError(f"prompt {bad}: 'id' must be a non-empty string, got {ids[bad]!r}")
    config = record_config if record_config is not None else {
        "model": str(model.cfg.model_name), "max_new_tokens": max_new_tokens, "temperature": temperature,
        "batch_size": batch_size, "seed": seed,
    }
    out_file = Path(out_file)
    with claim_output(out_file, "generate", config, overwrite=overwrite, is_file=True):
        kept: list[str] = []
        if out_file.exists():
            records, damaged = read_responses(out_file, ids)
            for number, problem in damaged:
                note = f"{out_file}:{number}: {problem}; dropped, and its response is sampled again"
                if on_damaged_line is None:
                    warnings.warn(note, stacklevel=2)
                else:
                    on_damaged_line(note)
            kept = [json.dumps(record) + "\n" for record in records]
        done = {json.loads(line)["id"] for line in kept}
        todo = [p for p in prompts if p["id"] not in done]
        with tqdm(total=len(prompts), initial=len(done), desc="generate", unit="resp", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                batch_seed = seed * 1_000_003 + sum(map(ord, chunk[0]["id"]))
                items = sample_responses(
                    model, [p["prompt"] for p in chunk], max_new_tokens=max_new_tokens,
                    temperature=temperature, seed=batch_seed, progress=progress,
                )
                for prompt, item in zip(chunk, items, strict=False):
                    record = {
                        **prompt,
                        **item,
                        "model_id": str(model.cfg.model_name),
                        "temperature": temperature,
                        "messages": [
                            {"role": "user", "content": prompt["prompt"]},
                            {"role": "assistant", "content": item["text"] or "(empty)"},
                        ],
                    }
                    kept.append(json.dumps(record) + "\n")
                write_text(out_file, "".join(kept))
                bar.update(len(chunk))
        if not out_file.exists():
            write_text(out_file, "".join(kept))
    return out_file

