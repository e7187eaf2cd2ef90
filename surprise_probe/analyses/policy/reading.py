"""Readers: every model reads every source under every format, teacher-forced.

For each prompt a reader reads, with the same prompt ids in front (:func:`prefix_ids`):

- ``own``: its own response to this prompt (the sampled ids, in the format it sampled in);
- ``own_other_prompt``: its own response to another prompt (prompt ``i + 1``, cyclically): its
  own style, but not an answer to this prompt;
- ``writer:<model>``: every other model's response to this prompt (text, tokenized by the reader):
  the reader x writer matrix;
- ``human``: the human-written answer, when the prompt file has one.

The scored span is the response's content tokens (as in ``capture``: the output entropy at a
response token is the reader's uncertainty about the next token after reading it). Own text is
read from its exact sampled ids only in the format it was sampled in; in any other format it is
re-tokenized from its text like every other source. An empty response is kept as a
:class:`Reading` with no tokens, so it is counted, never silently dropped.

The same forward gives, per response token, the per-token quantities of the zero-shot detectors
(:func:`surprise_probe.core.forward.passes.scored_metrics`: log-likelihood, log-rank, and
Fast-DetectGPT's expected log-likelihood and its variance); an ``observer`` model with the reader's
tokenizer reads the same ids too and adds Binoculars' cross-entropy term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from surprise_probe.analyses.policy.prompts import GapPrompt, prefix_ids, text_response_ids
from surprise_probe.analyses.policy.writers import WriterResponse
from surprise_probe.core.forward.passes import scored_metrics
from surprise_probe.core.text.encoding import Encoded, pad_batch, pad_id
from surprise_probe.core.utils.progress import tqdm

__all__ = ["Reading", "read_responses"]


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
    # Per scored token x_t, from the distribution p that predicted it (float64, aligned with entropy):
    log_likelihood: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log p(x_t)
    log_rank: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log rank of x_t under p (rank 1 = top)
    expected_log_likelihood: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sum_v p log p
    log_likelihood_variance: np.ndarray = field(default_factory=lambda: np.zeros(0))  # variance of log p(X), X ~ p
    # Binoculars: -sum_v q log p with q the observer's distribution on the same ids (empty: no observer)
    cross_entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    observer: str | None = None  # the model that gave ``cross_entropy``


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


def read_responses(
    model,
    reader: str,
    prompts: Sequence[GapPrompt],
    responses: Mapping[str, Sequence[WriterResponse]],
    formats: Sequence[str],
    *,
    batch_size: int = 8,
    probe=None,
    observer=None,
    observer_name: str | None = None,
    progress: bool = True,
) -> list[Reading]:
    """Teacher-forced reads of every source under every format; one :class:`Reading` each.

    ``observer`` (a model with the reader's tokenizer, named ``observer_name``) reads the same ids
    for Binoculars' cross term; a sequence longer than its context gets none (empty ``cross_entropy``).
    """
    n_ctx = int(model.cfg.n_ctx)
    observer_ctx = int(observer.cfg.n_ctx) if observer is not None else 0
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
            fits = observer is not None and max(batch.lengths) <= observer_ctx
            metrics, stored = scored_metrics(model, batch, hooks, observer=observer if fits else None)
            per_token = {name: getattr(metrics, name).double().cpu().numpy() for name in _PER_TOKEN}
            cross = None
            if observer is not None and not fits:  # only the rows that fit the observer's context
                cross = _observer_cross_entropy(model, observer, encoded, observer_ctx)
            elif fits:
                cross = metrics.cross_entropy.double().cpu().numpy()
            scored = batch.scored.numpy()
            if probe is not None:
                acts = stored[probe.hook].float().cpu().numpy()
            for row, (key, _, _) in enumerate(chunk):
                readout = float(probe.project(acts[row][scored[row]]).mean()) if probe is not None else float("nan")
                span = {name: values[row][scored[row]] for name, values in per_token.items()}
                row_cross = np.zeros(0) if cross is None or cross[row] is None else cross[row][scored[row]]
                readings.append(Reading(key[0], key[1], key[2], key[3], key[4], key[5], span.pop("output_entropy"),
                                        readout, key[6], **span, cross_entropy=row_cross,
                                        observer=observer_name if len(row_cross) else None))
            bar.update(len(chunk))
    bar.close()
    return readings


_PER_TOKEN = ("output_entropy", "log_likelihood", "log_rank", "expected_log_likelihood", "log_likelihood_variance")


def _observer_cross_entropy(model, observer, encoded: list[Encoded], observer_ctx: int) -> list[np.ndarray | None]:
    """Binoculars' cross term for the rows that fit the observer's context (None for the others); the
    reader reads those rows again (rare: only where the observer's context is the shorter)."""
    out: list[np.ndarray | None] = [None] * len(encoded)
    keep = [i for i, e in enumerate(encoded) if len(e) <= observer_ctx]
    if keep:
        batch = pad_batch([encoded[i] for i in keep], pad_id(model), "right")
        metrics, _ = scored_metrics(model, batch, observer=observer)
        cross = metrics.cross_entropy.double().cpu().numpy()
        for row, i in enumerate(keep):
            grid = np.full(max(len(e) for e in encoded), np.nan)
            grid[: cross.shape[1]] = cross[row]
            out[i] = grid
    return out
