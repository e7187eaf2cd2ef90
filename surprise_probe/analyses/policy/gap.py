"""The on-policy vs off-policy entropy gap: how a model reads its own text vs anyone else's.

For each prompt, every reader model samples a response (on-policy; the exact sampled ids are kept)
and then reads, under identical templating, with the same prompt ids in front:

- ``own``: its own response to this prompt (the sampled ids, in the format it sampled in);
- ``own_other_prompt``: its own response to another prompt (prompt ``i + 1``, cyclically): its
  own style, but not an answer to this prompt;
- ``writer:<model>``: every other model's response to this prompt (text, tokenized by the reader):
  the reader x writer matrix;
- ``human``: the human-written answer, when the prompt file has one.

Formats (the formatting control): ``assistant`` (the response is the assistant turn after the
prompt, chat template), ``user`` (prompt and response together in one user turn, chat template)
and ``plain`` (:data:`surprise_probe.core.forward.sampling.PLAIN_FORMAT`, ``Question: ...\\nAnswer:`` then the
response; no template). A model without a chat template samples and reads in ``plain`` only.

The scored span is the response's content tokens (as in ``capture``: the output entropy at a
response token is the reader's uncertainty about the next token after reading it). Own text is
read from its exact sampled ids only in the format it was sampled in; in any other format it is
re-tokenized from its text like every other source. Empty responses are counted and reported per
cell; they have no tokens to score and are left out of means, never silently.

Statistics (per reader x format x source, CIs over prompts, prompt = unit): mean entropy over the
span and over the first ``k`` tokens; entropy by position; per-prompt paired differences
(off - on) with a sign count and sign test; the off/on ratio with a paired bootstrap CI; the AUROC
of telling own from off-policy responses by mean entropy alone (lower = own) with a DeLong CI, and,
given a probe direction, by the probe's mean readout over the span.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.core.forward.passes import forward_metrics
from surprise_probe.core.forward.sampling import (
    PLAIN_FORMAT,
    chat_prompt_ids,
    plain_prompt_ids,
    sample,
)
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.encoding import Encoded, pad_batch, pad_id
from surprise_probe.core.text.files import builtin_items, builtin_prompts
from surprise_probe.core.utils.jsonio import read_json, read_jsonl, software_versions, write_json
from surprise_probe.core.utils.plots import write_report
from surprise_probe.core.utils.stats import bootstrap_sums
from surprise_probe.probes.direction import ProbeDirection

__all__ = [
    "FORMATS",
    "GapPrompt",
    "WriterResponse",
    "Reading",
    "GapResult",
    "read_gap_prompts",
    "builtin_gap_prompts",
    "has_chat_template",
    "prefix_ids",
    "text_response_ids",
    "sample_writer",
    "read_sources",
    "summarize",
    "policy_gap",
    "auroc_with_ci",
]

FORMATS = ("assistant", "user", "plain")
USER_TURN_JOIN = "\n\n"  # the user format's separator between prompt and response
_SENTINEL = "\u2063SP-RESPONSE\u2063"


@dataclass(frozen=True)
class GapPrompt:
    id: str
    prompt: str
    answer: str | None = None


def read_gap_prompts(path: str | Path) -> list[GapPrompt]:
    """Prompts from a ``.jsonl`` of ``{"prompt": str, "answer": str (optional), "id": str (optional)}``.

    Any malformed line is an error naming ``file:line``; duplicated ids too.
    """
    prompts, seen = [], {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with a 'prompt' string, got {type(record).__name__}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        answer = record.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            raise ValueError(f"{where}: 'answer' must be a non-empty string when given, got {answer!r:.60}")
        pid = record.get("id", f"line-{number}")
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"{where}: 'id' must be a non-empty string when given, got {pid!r:.60}")
        if pid in seen:
            raise ValueError(f"{where}: id {pid!r} already used on line {seen[pid]}")
        seen[pid] = number
        prompts.append(GapPrompt(pid, prompt, answer))
    if not prompts:
        raise ValueError(f"{path} holds no prompts; expected one {{\"prompt\": ...}} object per line")
    return prompts


def builtin_gap_prompts() -> list[GapPrompt]:
    """The built-in conversations (prompt + human answer) first, then the open prompts (no answer)."""

    prompts = []
    for item in builtin_items():
        messages = item["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        prompts.append(GapPrompt(str(item.get("id", len(prompts))), user, answer))
    prompts += [GapPrompt(str(p["id"]), p["prompt"], None) for p in builtin_prompts()]
    return prompts


def has_chat_template(model) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None))


def prefix_ids(model, prompt: str, fmt: str) -> list[int]:
    """The token ids in front of the response in format ``fmt`` (identical for every source)."""
    if fmt == "plain":
        return plain_prompt_ids(model, prompt)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not has_chat_template(model):
        raise ValueError(
            f"model {model_id(model)!r} has no chat template, so it cannot read the {fmt!r} format; "
            f"use the plain format ({PLAIN_FORMAT!r})"
        )
    if fmt == "assistant":
        return chat_prompt_ids(model, prompt)
    # user: the prompt and the response in one user turn; the prefix is the rendered template up
    # to where the response starts.
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt + USER_TURN_JOIN + _SENTINEL}], tokenize=False,
        add_generation_prompt=False,
    )
    head = text[: text.index(_SENTINEL)]
    return list(model.tokenizer(head, add_special_tokens=False)["input_ids"])


def text_response_ids(model, text: str, fmt: str) -> list[int]:
    """A response text as the reader's tokens (plain format: after ``Answer:`` with one space)."""
    text = text.strip()
    if not text:
        return []
    return list(model.tokenizer((" " if fmt == "plain" else "") + text, add_special_tokens=False)["input_ids"])


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


@dataclass(frozen=True)
class Reading:
    reader: str
    format: str
    source: str
    prompt_index: int
    sample_index: int
    exact_ids: bool  # read from the sampled ids (True) or from text (False)
    entropy: np.ndarray  # float64, one value per scored (response) token; empty for an empty response
    probe_readout: float = float("nan")  # mean probe projection over the span, when a probe is given
    truncated: int = 0  # response tokens cut to fit the context


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _write_lines(path: Path, records: list[dict]) -> None:
    # Whole file through a temporary file + rename: a kill never leaves half a line.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        store.parent.mkdir(parents=True, exist_ok=True)
        record_path = store.with_name(store.name + ".config.json")
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
            _write_lines(store, kept)
        bar.update(len(chunk))
    bar.close()
    index = {p.id: i for i, p in enumerate(prompts)}
    out = [
        WriterResponse(name, index[r["prompt_id"]], r["prompt_id"], r["sample_index"], r["format"],
                       list(r["content_ids"]), bool(r["ended"]), r["text"])
        for r in done.values() if r["prompt_id"] in wanted and r["sample_index"] < n_samples
    ]
    return sorted(out, key=lambda r: (r.prompt_index, r.sample_index))


def _source_items(reader: str, model, prompts, responses, formats):
    """Yield ``(fmt, source, prompt_index, sample_index, exact, prefix, response_ids)``."""
    n = len(prompts)
    by_key = {w: {(r.prompt_index, r.sample_index): r for r in rs} for w, rs in responses.items()}
    own = by_key[reader]
    n_samples = 1 + max(j for _, j in own)
    for fmt in formats:
        for i, prompt in enumerate(prompts):
            prefix = prefix_ids(model, prompt.prompt, fmt)

            def ids_of(response, exact_ok, fmt=fmt):
                exact = exact_ok and response.format == fmt
                return exact, (response.content_ids if exact else text_response_ids(model, response.text, fmt))

            for j in range(n_samples):
                exact, ids = ids_of(own[(i, j)], True)
                yield fmt, "own", i, j, exact, prefix, ids
                if n > 1:
                    exact, ids = ids_of(own[((i + 1) % n, j)], True)
                    yield fmt, "own_other_prompt", i, j, exact, prefix, ids
                for writer, table in by_key.items():
                    if writer == reader:
                        continue
                    other = table.get((i, j)) or table[(i, 0)]
                    yield fmt, f"writer:{writer}", i, j, False, prefix, ids_of(other, False)[1]
            if prompt.answer is not None:
                yield fmt, "human", i, 0, False, prefix, text_response_ids(model, prompt.answer, fmt)


def read_sources(
    model,
    reader: str,
    prompts: Sequence[GapPrompt],
    responses: Mapping[str, Sequence[WriterResponse]],
    formats: Sequence[str],
    *,
    batch_size: int = 8,
    probe=None,
    progress: bool = True,
) -> list[Reading]:
    """Teacher-forced reads of every source under every format; one :class:`Reading` each."""
    n_ctx = int(model.cfg.n_ctx)
    planned, readings = [], []
    for fmt, source, i, j, exact, prefix, ids in _source_items(reader, model, prompts, responses, formats):
        truncated = max(0, len(prefix) + len(ids) - n_ctx)
        ids = ids[: len(ids) - truncated] if truncated else ids
        if not ids:
            readings.append(Reading(reader, fmt, source, i, j, exact, np.zeros(0), float("nan"), truncated))
            continue
        planned.append(((reader, fmt, source, i, j, exact, truncated), prefix, ids))
    planned.sort(key=lambda p: len(p[1]) + len(p[2]))
    hooks = [probe.hook] if probe is not None else []
    bar = tqdm(total=len(planned), desc=f"read {reader}", unit="seq", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(planned), batch_size):
            chunk = planned[start : start + batch_size]
            encoded = [
                Encoded(np.asarray(prefix + ids, np.int64),
                        np.asarray([False] * len(prefix) + [True] * len(ids)), "token_ids")
                for _, prefix, ids in chunk
            ]
            batch = pad_batch(encoded, pad_id(model), "right")
            _, entropy, stored = forward_metrics(model, batch, hooks)
            entropy = entropy.double().cpu().numpy()
            scored = batch.scored.numpy()
            if probe is not None:
                acts = stored[probe.hook].float().cpu().numpy()
            for row, (key, _, _) in enumerate(chunk):
                readout = float(probe.project(acts[row][scored[row]]).mean()) if probe is not None else float("nan")
                readings.append(Reading(key[0], key[1], key[2], key[3], key[4], key[5],
                                        entropy[row][scored[row]], readout, key[6]))
            bar.update(len(chunk))
    bar.close()
    return readings


def auroc_with_ci(
    positives: Float[np.ndarray, " m"], negatives: Float[np.ndarray, " n"], level: float = 0.95
) -> dict:
    """AUROC = P(score of a positive > score of a negative) (+ half the ties), with a DeLong CI.

    >>> auroc_with_ci(np.array([3.0, 4.0]), np.array([1.0, 2.0]))["auroc"]
    1.0
    """
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return {"auroc": float("nan"), "low": float("nan"), "high": float("nan"), "n_pos": m, "n_neg": n}
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    v10, v01 = psi.mean(1), psi.mean(0)
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    z = scipy.stats.norm.ppf(0.5 + level / 2)
    half = z * math.sqrt(max(var, 0.0))
    return {"auroc": auc, "low": max(0.0, auc - half), "high": min(1.0, auc + half), "n_pos": m, "n_neg": n,
            "level": level, "method": "DeLong"}


def _ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    """Mean of per-prompt values with a bootstrap CI over prompts."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n_prompts": 0}
    point, low, high = bootstrap_sums(np.divide, values, np.ones_like(values), n_boot=n_boot, level=level, seed=seed)
    return {"mean": point, "low": low, "high": high, "n_prompts": len(values)}


def _per_prompt(readings: list[Reading], k: int | None) -> dict[int, float]:
    """Per prompt: mean over its responses of each response's mean entropy (first k tokens if k)."""
    values: dict[int, list[float]] = {}
    for r in readings:
        if len(r.entropy):
            values.setdefault(r.prompt_index, []).append(float(r.entropy[:k].mean()))
    return {i: float(np.mean(v)) for i, v in values.items()}


def _paired(on: dict[int, float], off: dict[int, float], n_boot: int, level: float, seed: int) -> dict:
    shared = sorted(set(on) & set(off))
    a, b = np.array([off[i] for i in shared]), np.array([on[i] for i in shared])
    if not shared:
        return {"n_prompts": 0}
    ratio = bootstrap_sums(np.divide, a, b, n_boot=n_boot, level=level, seed=seed)
    diff = _ci(a - b, n_boot, level, seed)
    n_higher = int((a > b).sum())
    n_lower = int((a < b).sum())
    p = scipy.stats.binomtest(n_higher, n_higher + n_lower).pvalue if n_higher + n_lower else float("nan")
    return {
        "n_prompts": len(shared),
        "ratio_off_on": {"value": ratio[0], "low": ratio[1], "high": ratio[2]},
        "difference_off_minus_on": diff,
        "sign_count": {"off_higher": n_higher, "off_lower": n_lower, "ties": len(shared) - n_higher - n_lower,
                       "sign_test_p": p},
    }


def summarize(
    readings: Sequence[Reading], *, k: int = 8, max_position: int = 48, n_boot: int = 1000, level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Cells, paired comparisons against ``own``, AUROCs, position curves and the reader x writer matrix."""
    groups: dict[tuple[str, str, str], list[Reading]] = {}
    for r in readings:
        groups.setdefault((r.reader, r.format, r.source), []).append(r)
    cells, comparisons, curves = [], [], []
    for (reader, fmt, source), rs in sorted(groups.items()):
        tokens = np.concatenate([r.entropy for r in rs]) if rs else np.zeros(0)
        lengths = np.array([len(r.entropy) for r in rs])
        whole, first = _per_prompt(rs, None), _per_prompt(rs, k)
        cells.append({
            "reader": reader, "format": fmt, "source": source,
            "n_responses": len(rs), "n_empty": int((lengths == 0).sum()),
            "n_truncated": int(sum(r.truncated > 0 for r in rs)),
            "n_exact_ids": int(sum(r.exact_ids for r in rs)),
            "n_tokens": int(len(tokens)), "mean_length": float(lengths.mean()) if len(rs) else float("nan"),
            "mean_entropy": _ci(np.array(list(whole.values())), n_boot, level, seed),
            f"mean_entropy_first_{k}": _ci(np.array(list(first.values())), n_boot, level, seed),
            "n_tokens_first_k": int(sum(min(len(r.entropy), k) for r in rs)),
        })
        # Entropy by position: per prompt, the mean over its responses at each position.
        sums = np.zeros((max_position, 0))
        counts = np.zeros((max_position, 0))
        per_prompt: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for r in rs:
            s, c = per_prompt.setdefault(r.prompt_index, (np.zeros(max_position), np.zeros(max_position)))
            e = r.entropy[:max_position]
            s[: len(e)] += e
            c[: len(e)] += 1
        if per_prompt:
            sums = np.stack([v[0] for v in per_prompt.values()], 1)
            counts = np.stack([v[1] for v in per_prompt.values()], 1)
            point, low, high = bootstrap_sums(np.divide, sums, counts, n_boot=n_boot, level=level, seed=seed)
            curves.append({"reader": reader, "format": fmt, "source": source, "mean": point, "low": low,
                           "high": high, "n_tokens": counts.sum(1)})
    for (reader, fmt, source), rs in sorted(groups.items()):
        if source == "own" or (reader, fmt, "own") not in groups:
            continue
        own = groups[(reader, fmt, "own")]
        on_whole, off_whole = _per_prompt(own, None), _per_prompt(rs, None)
        on_first, off_first = _per_prompt(own, k), _per_prompt(rs, k)
        row = {"reader": reader, "format": fmt, "source": source,
               "span": _paired(on_whole, off_whole, n_boot, level, seed),
               f"first_{k}": _paired(on_first, off_first, n_boot, level, seed)}
        # AUROC: own responses are the positives; a lower mean entropy should mean own, so the
        # score is -entropy (0.5 = indistinguishable).
        own_means = np.array([r.entropy.mean() for r in own if len(r.entropy)])
        off_means = np.array([r.entropy.mean() for r in rs if len(r.entropy)])
        row["auroc_entropy"] = auroc_with_ci(-own_means, -off_means, level)
        own_probe = np.array([r.probe_readout for r in own if np.isfinite(r.probe_readout)])
        off_probe = np.array([r.probe_readout for r in rs if np.isfinite(r.probe_readout)])
        if len(own_probe) and len(off_probe):
            # The surprise probe reads lower predicted surprise on own text: score = -readout.
            row["auroc_probe"] = auroc_with_ci(-own_probe, -off_probe, level)
        comparisons.append(row)
    return {"cells": cells, "comparisons": comparisons, "curves": curves, "matrix": _matrix(cells)}


def _matrix(cells: list[dict]) -> dict:
    """Per format: reader x writer mean entropy (writer = reader is the on-policy read)."""
    out: dict[str, dict] = {}
    for cell in cells:
        source = cell["source"]
        if source == "own":
            writer = cell["reader"]
        elif source.startswith("writer:"):
            writer = source.split(":", 1)[1]
        elif source == "human":
            writer = "human"
        else:
            continue
        out.setdefault(cell["format"], {}).setdefault(cell["reader"], {})[writer] = cell["mean_entropy"]
    return out


@dataclass
class GapResult:
    """Everything the gap analysis measured, with its configuration."""

    config: dict
    models: list[dict]
    prompts: list[dict]
    responses: dict[str, list[WriterResponse]]
    readings: list[Reading]
    summary: dict
    elapsed_seconds: float = 0.0
    versions: dict = field(default_factory=software_versions)

    def comparison(self, reader: str, fmt: str, source: str) -> dict:
        for row in self.summary["comparisons"]:
            if (row["reader"], row["format"], row["source"]) == (reader, fmt, source):
                return row
        raise KeyError(f"no comparison for reader {reader!r}, format {fmt!r}, source {source!r}")

    def cell(self, reader: str, fmt: str, source: str) -> dict:
        for row in self.summary["cells"]:
            if (row["reader"], row["format"], row["source"]) == (reader, fmt, source):
                return row
        raise KeyError(f"no cell for reader {reader!r}, format {fmt!r}, source {source!r}")

    def report(self) -> str:
        """A plain-text summary: per reader and format, the on-policy entropy and each off/on ratio."""
        k = self.config["k"]
        lines = []
        for m in self.models:
            lines.append(f"reader {m['name']} ({'post-trained' if m['post_trained'] else 'base' if m['post_trained'] is False else 'kind unknown'}, "
                         f"samples in {m['sampling_format']} format; {m['n_empty_responses']} empty responses, "
                         f"mean {m['mean_response_tokens']:.1f} tokens)")
            for fmt in m["formats_read"]:
                try:
                    own = self.cell(m["name"], fmt, "own")["mean_entropy"]
                except KeyError:
                    continue
                lines.append(f"  {fmt:<9} own: {own['mean']:.3f} nats [{own['low']:.3f}, {own['high']:.3f}] "
                             f"n={own['n_prompts']}")
                for row in self.summary["comparisons"]:
                    if row["reader"] != m["name"] or row["format"] != fmt or not row["span"].get("n_prompts"):
                        continue
                    r, f, sign = row["span"]["ratio_off_on"], row[f"first_{k}"], row["span"]["sign_count"]
                    a = row["auroc_entropy"]
                    first = f.get("ratio_off_on", {}).get("value", float("nan"))
                    probe = row.get("auroc_probe")
                    lines.append(
                        f"    {row['source']:<28} off/on {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
                        f"  first {k}: {first:.3f}  off higher {sign['off_higher']}/{row['span']['n_prompts']}"
                        f"  AUROC {a['auroc']:.2f} [{a['low']:.2f}, {a['high']:.2f}]"
                        + (f"  probe AUROC {probe['auroc']:.2f} [{probe['low']:.2f}, {probe['high']:.2f}]"
                           if probe else "")
                    )
        if self.config.get("probe") and not any(m.get("probe") for m in self.models):
            lines.append(f"probe {self.config['probe']}: fitted on none of these models, so no probe AUROC")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "analysis": "policy_gap",
            "config": self.config,
            "models": self.models,
            "n_prompts": len(self.prompts),
            "n_prompts_with_human_answer": sum(p["has_answer"] for p in self.prompts),
            "prompts": self.prompts,
            "summary": self.summary,
            "per_response": [
                {"reader": r.reader, "format": r.format, "source": r.source, "prompt_index": r.prompt_index,
                 "sample_index": r.sample_index, "exact_ids": r.exact_ids, "n_tokens": len(r.entropy),
                 "mean_entropy": float(r.entropy.mean()) if len(r.entropy) else None,
                 "probe_readout": r.probe_readout, "truncated": r.truncated}
                for r in self.readings
            ],
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "software_versions": self.versions,
        }

    def save(self, folder: str | Path) -> dict[str, Path]:
        """``gap.json`` (config, results, sizes, versions) and ``gap.html`` (every figure, one page)."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        figures = policy_plots.all_figures(self)
        sections = [(policy_plots.CAPTIONS[name][0], f"<p>{policy_plots.CAPTIONS[name][1]}</p>") for name in figures]
        sections = [part for (heading, caption), fig in zip(sections, figures.values(), strict=True)
                    for part in ((heading, caption), ("", fig))]
        models = ", ".join(f"{m['name']} ({m['sampling_format']} sampling)" for m in self.models)
        intro = (f"<p>Readers and writers: {models}. {len(self.prompts)} prompts, "
                 f"{self.config['n_samples']} sample(s) each, up to {self.config['max_new_tokens']} tokens at "
                 f"temperature {self.config['temperature']}. Protocol and caveats: docs/policy-gap.md.</p>")
        return {
            "json": write_json(folder / "gap.json", self.to_dict()),
            "html": write_report(sections, folder / "gap.html", "On/off-policy entropy gap", intro),
        }


def _resolve(entry):
    return entry() if callable(entry) and not isinstance(entry, torch.nn.Module) else entry


def policy_gap(
    models: Mapping[str, object],
    prompts: Sequence[GapPrompt],
    *,
    formats: Sequence[str] | None = None,
    n_samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    k: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    sample_batch_size: int = 32,
    probe_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: bool = True,
    post_trained: Mapping[str, bool] | None = None,
) -> GapResult:
    """Sample with every model, have every model read every source, and summarize.

    ``models`` maps a name to a loaded model or to a zero-argument loader; loaders are called when
    a model is needed and at most one model is held at a time (sample with each in order, then read
    in reverse order, so the last one is loaded once). ``formats=None`` reads every format a model
    can (all three with a chat template, ``plain`` without); explicit chat formats for a model
    without a template are an error. ``work_dir`` keeps the sampled responses (resumable).
    ``batch_size`` sequences go through one teacher-forced read; ``sample_batch_size`` rows are
    sampled together (a one-token decoding step reads every weight once whatever the batch, so
    larger sampling batches are nearly free on a CPU). ``probe_path`` (a saved probe direction) adds the probe-readout AUROC for the reader it was
    fitted on.
    """
    started = time.perf_counter()
    names = list(models)
    if not names:
        raise ValueError("policy_gap needs at least one model")
    if not prompts:
        raise ValueError("policy_gap needs at least one prompt")
    if formats is not None:
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    if k < 1:
        raise ValueError(f"k (matched first tokens) must be >= 1, got {k}")
    loaded: dict[str, object] = {}

    def get(name):
        if name not in loaded:
            loaded.clear()
            gc.collect()
            loaded[name] = _resolve(models[name])
        return loaded[name]

    info, responses = {}, {}
    for name in names:
        model = get(name)
        template = has_chat_template(model)
        if formats is None:
            read_formats = list(FORMATS) if template else ["plain"]
        elif not template and any(f != "plain" for f in formats):
            raise ValueError(
                f"model {name!r} has no chat template, so it cannot read the formats "
                f"{[f for f in formats if f != 'plain']}; request --formats plain (the documented plain "
                f"format {PLAIN_FORMAT!r}) or leave --formats at its default"
            )
        else:
            read_formats = list(formats)
        sample_format = "assistant" if template else "plain"
        info[name] = {
            "name": name, "model_id": model_id(model), "backend": type(model).__name__,
            "has_chat_template": template, "sampling_format": sample_format, "formats_read": read_formats,
            "post_trained": None if post_trained is None else post_trained.get(name),
            "n_layers": int(model.cfg.n_layers), "d_vocab": int(model.cfg.d_vocab),
        }
        store = Path(work_dir) / "responses" / f"{_safe(name)}.jsonl" if work_dir is not None else None
        responses[name] = sample_writer(
            model, name, prompts, fmt=sample_format, n_samples=n_samples, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed, batch_size=sample_batch_size, store=store, overwrite=overwrite,
            progress=progress,
        )
        info[name]["n_empty_responses"] = sum(not r.content_ids for r in responses[name])
        info[name]["n_ended_at_end_of_turn"] = sum(r.ended for r in responses[name])
        info[name]["mean_response_tokens"] = float(np.mean([len(r.content_ids) for r in responses[name]]))
    readings: list[Reading] = []
    for name in reversed(names):
        model = get(name)
        probe = None
        if probe_path is not None:

            candidate = ProbeDirection.load(probe_path)
            if candidate.model_id == model_id(model) and candidate.d_model == int(model.cfg.d_model):
                probe = candidate
        info[name]["probe"] = None if probe is None else {"hook": probe.hook, "model_id": probe.model_id}
        readings += read_sources(model, name, prompts, responses, info[name]["formats_read"],
                                 batch_size=batch_size, probe=probe, progress=progress)
    loaded.clear()
    summary = summarize(readings, k=k, max_position=max_new_tokens, n_boot=n_boot, level=level, seed=seed)
    config = {
        "models": names, "formats": None if formats is None else list(formats), "n_samples": n_samples,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "k": k, "seed": seed,
        "batch_size": batch_size, "sample_batch_size": sample_batch_size, "probe": None if probe_path is None else str(probe_path),
        "n_boot": n_boot, "level": level, "plain_format": PLAIN_FORMAT, "user_turn_join": USER_TURN_JOIN,
        "scored_span": "response content tokens (stop id excluded)",
        "own_other_prompt": "the reader's own response to prompt i+1 (cyclic)",
    }
    prompt_rows = [{"id": p.id, "has_answer": p.answer is not None} for p in prompts]
    return GapResult(config, [info[n] for n in names], prompt_rows, responses, readings, summary,
                     time.perf_counter() - started)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


