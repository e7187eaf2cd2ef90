"""The on-policy vs off-policy entropy gap: how a model reads its own text vs anyone else's.

:func:`policy_gap` runs the analysis in three steps: every model samples its own responses
(:mod:`~surprise_probe.analyses.policy.writers`), every model reads every source under every
format it can (:mod:`~surprise_probe.analyses.policy.reading`; the sources are ``own``,
``own_other_prompt``, ``writer:<model>`` and ``human``, the formats ``assistant``, ``user`` and
``plain``, see :mod:`~surprise_probe.analyses.policy.prompts`), and the reads are summarized
(:mod:`~surprise_probe.analyses.policy.statistics`) into a
:class:`~surprise_probe.analyses.policy.result.GapResult`. At most one model is held at a time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from surprise_probe.analyses.policy.prompts import (
    FORMATS,
    USER_TURN_JOIN,
    GapPrompt,
    has_chat_template,
)
from surprise_probe.analyses.policy.reading import Reading, read_sources
from surprise_probe.analyses.policy.result import GapResult
from surprise_probe.analyses.policy.statistics import summarize
from surprise_probe.analyses.policy.writers import WriterResponse, sample_writer
from surprise_probe.core.forward.sampling import PLAIN_FORMAT
from surprise_probe.core.models.loading import model_id
from surprise_probe.probes.direction import ProbeDirection

__all__ = ["policy_gap"]


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
    _check_arguments(names, prompts, formats, k)
    held = _OneModelAtATime(models)
    info, responses = {}, {}
    for name in names:
        model = held.get(name)
        info[name] = _model_info(name, model, formats, post_trained)
        store = Path(work_dir) / "responses" / f"{_safe(name)}.jsonl" if work_dir is not None else None
        responses[name] = sample_writer(
            model, name, prompts, fmt=info[name]["sampling_format"], n_samples=n_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=sample_batch_size,
            store=store, overwrite=overwrite, progress=progress,
        )
        info[name].update(_response_sizes(responses[name]))
    readings: list[Reading] = []
    for name in reversed(names):
        model = held.get(name)
        probe = _probe_for(model, probe_path)
        info[name]["probe"] = None if probe is None else {"hook": probe.hook, "model_id": probe.model_id}
        readings += read_sources(model, name, prompts, responses, info[name]["formats_read"],
                                 batch_size=batch_size, probe=probe, progress=progress)
    held.release()
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


def _check_arguments(names: list[str], prompts: Sequence[GapPrompt], formats: Sequence[str] | None, k: int) -> None:
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


class _OneModelAtATime:
    """The models by name, each loaded when asked for; asking for another drops the one held first."""

    def __init__(self, models: Mapping[str, object]):
        self._models = models
        self._loaded: dict[str, object] = {}

    def get(self, name: str):
        if name not in self._loaded:
            self._loaded.clear()
            gc.collect()
            self._loaded[name] = _resolve(self._models[name])
        return self._loaded[name]

    def release(self) -> None:
        self._loaded.clear()


def _resolve(entry):
    return entry() if callable(entry) and not isinstance(entry, torch.nn.Module) else entry


def _model_info(name: str, model, formats: Sequence[str] | None, post_trained: Mapping[str, bool] | None) -> dict:
    """What the result records of a model, with the format it samples in and the formats it reads."""
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
    return {
        "name": name, "model_id": model_id(model), "backend": type(model).__name__,
        "has_chat_template": template, "sampling_format": "assistant" if template else "plain",
        "formats_read": read_formats,
        "post_trained": None if post_trained is None else post_trained.get(name),
        "n_layers": int(model.cfg.n_layers), "d_vocab": int(model.cfg.d_vocab),
    }


def _response_sizes(responses: Sequence[WriterResponse]) -> dict:
    return {
        "n_empty_responses": sum(not r.content_ids for r in responses),
        "n_ended_at_end_of_turn": sum(r.ended for r in responses),
        "mean_response_tokens": float(np.mean([len(r.content_ids) for r in responses])),
    }


def _probe_for(model, probe_path: str | Path | None) -> ProbeDirection | None:
    """The probe direction at ``probe_path`` if it was fitted on this model, else None."""
    if probe_path is None:
        return None
    candidate = ProbeDirection.load(probe_path)
    if candidate.model_id == model_id(model) and candidate.d_model == int(model.cfg.d_model):
        return candidate
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
