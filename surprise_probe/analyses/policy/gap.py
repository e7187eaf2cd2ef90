"""The on-policy vs off-policy entropy gap: how a model reads its own text vs anyone else's.

:func:`policy_gap` runs the analysis in three steps: every model samples its own responses
(:mod:`~surprise_probe.analyses.policy.writers`), every model reads every source under every
format it can (:mod:`~surprise_probe.analyses.policy.reading`; the sources are ``own``,
``own_other_prompt``, ``writer:<model>`` and ``human``, the formats ``assistant``, ``user`` and
``plain``, see :mod:`~surprise_probe.analyses.policy.prompts`), and the reads are summarized
(:mod:`~surprise_probe.analyses.policy.statistics`) into a
:class:`~surprise_probe.analyses.policy.result.GapResult`. At most one model is held at a time,
except for Binoculars: a reader whose tokenizer another model shares reads with that model beside
it (the observer), so two are held.

The same reads give the zero-shot detectors of model-written text (mean log-likelihood, mean
log-rank, Fast-DetectGPT, Binoculars) beside the entropy AUROC; ``temperatures`` adds the
temperature curve: each reader's own responses sampled again at each temperature, and the off/on
ratio against them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
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
from surprise_probe.analyses.policy.reading import Reading, read_responses
from surprise_probe.analyses.policy.result import GapResult
from surprise_probe.analyses.policy.statistics import summarize, temperature_curve
from surprise_probe.analyses.policy.writers import WriterResponse, sample_writer
from surprise_probe.core.forward.sampling import PLAIN_FORMAT
from surprise_probe.core.models.loading import model_id
from surprise_probe.probes.direction import ProbeDirection

__all__ = ["policy_gap", "check_temperatures"]


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
    temperatures: Sequence[float] | None = None,
    binoculars: bool = True,
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

    ``temperatures`` (positive numbers, e.g. ``[0.3, 0.7, 1.0]``) adds ``summary["temperature_curve"]``:
    each reader samples its own responses again at each temperature (the main ``temperature``'s
    samples are reused) and reads them in its sampling format; the off/on ratio against each
    off-policy source's reads (which do not depend on the temperature) is given with its CI.
    ``binoculars=False`` skips Binoculars, so no two models are ever held together.
    """
    started = time.perf_counter()
    names = list(models)
    _check_arguments(names, prompts, formats, k)
    temperatures = check_temperatures(temperatures)
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
        info[name]["tokenizer_hash"] = _tokenizer_hash(model)
    pairs = _binocular_pairs(names, info, binoculars)
    readings: list[Reading] = []
    by_temperature: dict[float, list[Reading]] = {t: [] for t in temperatures}
    temperature_responses: dict[float, dict[str, list[WriterResponse]]] = {t: {} for t in temperatures}
    for name in reversed(names):
        observer_name = pairs[name]["observer"]
        model, observer = held.get_pair(name, observer_name)
        probe = _probe_for(model, probe_path)
        info[name]["probe"] = None if probe is None else {"hook": probe.hook, "model_id": probe.model_id}
        mine = read_responses(model, name, prompts, responses, info[name]["formats_read"], batch_size=batch_size,
                            probe=probe, observer=observer, observer_name=observer_name, progress=progress)
        readings += mine
        # The curve reads in the format the reader samples in (own text from its exact ids), or, if
        # that format is not read, in the first format read (own text re-tokenized, as there).
        sampled_in, read_in = info[name]["sampling_format"], info[name]["formats_read"]
        fmt = info[name]["curve_format"] = sampled_in if sampled_in in read_in else read_in[0]
        for t in temperatures:
            if t == temperature:  # the main samples: the sampler's seeds make a new draw the same ids
                temperature_responses[t][name] = responses[name]
                by_temperature[t] += [r for r in mine if r.format == fmt and r.source in ("own", "own_other_prompt")]
                continue
            store = (Path(work_dir) / "responses" / f"{_safe(name)}.T{t:g}.jsonl") if work_dir is not None else None
            drawn = sample_writer(
                model, name, prompts, fmt=sampled_in, n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=t,
                seed=seed, batch_size=sample_batch_size, store=store, overwrite=overwrite, progress=progress,
            )
            temperature_responses[t][name] = drawn
            # Only its own responses: prompts without answers, and no other writer.
            bare = [GapPrompt(p.id, p.prompt) for p in prompts]
            by_temperature[t] += read_responses(model, name, bare, {name: drawn}, [fmt], batch_size=batch_size,
                                              progress=progress)
    held.release()
    summary = summarize(readings, k=k, max_position=max_new_tokens, n_boot=n_boot, level=level, seed=seed,
                        binoculars=pairs)
    summary["temperature_curve"] = temperature_curve(
        readings, by_temperature, {n: info[n]["curve_format"] for n in names}, n_boot=n_boot, level=level,
        seed=seed)
    config = {
        "models": names, "formats": None if formats is None else list(formats), "n_samples": n_samples,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "k": k, "seed": seed,
        "batch_size": batch_size, "sample_batch_size": sample_batch_size, "probe": None if probe_path is None else str(probe_path),
        "n_boot": n_boot, "level": level, "plain_format": PLAIN_FORMAT, "user_turn_join": USER_TURN_JOIN,
        "scored_span": "response content tokens (stop id excluded)",
        "own_other_prompt": "the reader's own response to prompt i+1 (cyclic)",
        "temperatures": list(temperatures) or None, "binoculars": binoculars,
    }
    prompt_rows = [{"id": p.id, "has_answer": p.answer is not None} for p in prompts]
    return GapResult(config, [info[n] for n in names], prompt_rows, responses, readings, summary,
                     time.perf_counter() - started, temperature_readings=by_temperature,
                     temperature_responses=temperature_responses)


def check_temperatures(temperatures: Sequence[float] | None) -> list[float]:
    """The curve's temperatures as floats, refusing any that is not a positive finite number or
    appears twice (the error names the value).

    >>> check_temperatures([0.3, 1])
    [0.3, 1.0]
    """
    out: list[float] = []
    for value in temperatures or ():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"temperatures: expected positive finite numbers, got {value!r}") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"temperatures: expected positive finite numbers, got {value!r}")
        if number in out:
            raise ValueError(f"temperatures: {value!r} is listed twice")
        out.append(number)
    return out


def _tokenizer_hash(model) -> str | None:
    """A fingerprint of the model's vocabulary (token -> id) and output size: equal means one tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{int(model.cfg.d_vocab_out)}:{vocab}".encode()).hexdigest()[:16]


def _binocular_pairs(names: list[str], info: dict, enabled: bool) -> dict[str, dict]:
    """Per reader: its Binoculars observer (another model with the same tokenizer; one of the other
    kind, base vs post-trained, first), or why it has none."""
    pairs = {}
    for name in names:
        if not enabled:
            pairs[name] = {"available": False, "observer": None, "reason": "turned off (binoculars=False)"}
            continue
        if len(names) == 1:
            pairs[name] = {"available": False, "observer": None,
                           "reason": "one reader: Binoculars needs a second model with the same tokenizer (e.g. a "
                                     "base and a post-trained model of one family) to read the same token ids"}
            continue
        mine = info[name]["tokenizer_hash"]
        same = [other for other in names if other != name and mine is not None
                and info[other]["tokenizer_hash"] == mine]
        if not same:
            others = ", ".join(f"{o} (vocabulary {info[o]['d_vocab']})" for o in names if o != name)
            pairs[name] = {"available": False, "observer": None,
                           "reason": f"no other reader shares {name}'s tokenizer (vocabulary {info[name]['d_vocab']}; "
                                     f"others: {others}); Binoculars needs two models' distributions over the same "
                                     "token ids"}
            continue
        kind = info[name]["post_trained"]
        same.sort(key=lambda o: (kind is None or info[o]["post_trained"] is None or info[o]["post_trained"] == kind))
        pairs[name] = {"available": True, "observer": same[0], "reason": None}
    return pairs


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
    """The models by name, each loaded when asked for; asking for another drops the one held first
    (:meth:`get_pair` holds two: a reader and its Binoculars observer)."""

    def __init__(self, models: Mapping[str, object]):
        self._models = models
        self._loaded: dict[str, object] = {}

    def get(self, name: str):
        return self.get_pair(name)[0]

    def get_pair(self, name: str, partner: str | None = None) -> tuple:
        """``name``'s model and ``partner``'s (None without one); every other model is dropped first."""
        wanted = [name] + ([partner] if partner is not None else [])
        dropped = [held for held in self._loaded if held not in wanted]
        for held in dropped:
            del self._loaded[held]
        if dropped:
            gc.collect()
        for want in wanted:
            if want not in self._loaded:
                self._loaded[want] = _resolve(self._models[want])
        return self._loaded[name], (self._loaded[partner] if partner is not None else None)

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
