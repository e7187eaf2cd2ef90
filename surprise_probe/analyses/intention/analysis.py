"""The cached-intention analyzer: has a model settled *what* to talk about before it writes?

For open-ended prompts with a topic lexicon (``{"prompt": ..., "topics": {"apple": ["apple"], ...}}``)
and one or more models, :func:`analyze_intention` measures, per model:

1. **Topic entropy at k = 0**: ``n_samples`` seeded responses per prompt, each labelled with the
   first topic it mentions (:mod:`surprise_probe.analyses.intention.topics`; "other"/"ambiguous" buckets kept), the
   plug-in entropy (nats) of the label distribution and the modal topic's share.
2. **Commitment curve**: with the first k = 1, 2, 4, 8, 16 tokens of a reference response revealed
   (a sampled response naming the modal topic), the topic entropy of ``n_samples`` continuations,
   each labelled as the whole response (revealed tokens + continuation, same total length).
3. **Pre-response decoding** from the residual stream at the last prompt token, at every depth:
   a logit-lens readout of the topics' first tokens, and a logistic probe for the modal topic
   with folds grouped by prompt (phrasings of one prompt never straddle folds), beside a
   shuffled-label control (labels permuted among prompts that share a lexicon) and the
   majority-class baseline.
4. **Prefill violation**: mean output entropy over the next ``prefill_tokens`` tokens after a
   prefilled start naming the model's own modal topic vs an equally long start (same token
   count) naming another topic of the lexicon, paired per prompt.

Every mean has a percentile bootstrap CI. Topic entropies resample prompts (groups of phrasings)
and, within each phrasing, samples; paired differences and accuracies resample prompts.
A post-trained model uses its chat template; a base model (or ``prompt_format="plain"``) the plain
format ``Question: {prompt}\\nAnswer:``.

>>> from surprise_probe.analyses.intention.prompts import builtin_intention_prompts
>>> from surprise_probe.testing import tiny_model
>>> prompts = builtin_intention_prompts()[:4]
>>> result = analyze_intention([tiny_model(n_ctx=128)], prompts, n_samples=2, max_new_tokens=4,
...                            ks=(0, 1), prefill_tokens=2, n_boot=20, progress=False)
>>> result.models[0].topic_entropy["n_rows"], result.models[0].prompt_format
(4, 'chat')
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from surprise_probe.analyses.intention.commitment import (
    _commitment_curve,
    _followup_rows,
    _row_summary,
    _sample_k0,
    _topic_entropy_at_k0,
    _TopicEstimates,
)
from surprise_probe.analyses.intention.config import IntentionConfig
from surprise_probe.analyses.intention.prefill import _prefill
from surprise_probe.analyses.intention.prompts import IntentionPrompt, _prompt_ids, _resolve_format
from surprise_probe.analyses.intention.readout import _readout
from surprise_probe.analyses.intention.results import IntentionResult, ModelIntention
from surprise_probe.analyses.intention.samples import _label_of, _model_cache
from surprise_probe.analyses.intention.topics import Labeller
from surprise_probe.core.models.loading import load_model, model_id
from surprise_probe.core.utils.progress import tqdm

__all__ = ["analyze_intention"]


def analyze_intention(
    models: Sequence,
    prompts: Sequence[IntentionPrompt],
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "auto",
    dtype: str = "float32",
    **settings,
) -> IntentionResult:
    """Run every measure on every model (loaded models, or names loaded one at a time).

    ``settings`` are :class:`IntentionConfig` fields. With ``cache_dir``, every finished sampling
    stage is written to ``cache_dir/<model>/<stage>.json`` with a key of the model, prompt format,
    prompts and sampling settings; a rerun whose key matches reuses it instead of sampling again
    (an interrupted run resumes at the first unfinished stage), any other key recomputes it.
    """
    config = IntentionConfig(**settings)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not models:
        raise ValueError("no models given")
    result = IntentionResult(config=config.to_dict(), prompts=[p.to_dict() for p in prompts])
    root = None if cache_dir is None else Path(cache_dir)
    for entry in models:
        started = time.perf_counter()
        model = load_model(entry, device=device, dtype=dtype) if isinstance(entry, (str, Path)) else entry
        torch.manual_seed(config.seed)
        analysis = _analyze_model(model, prompts, config, root, progress)
        analysis.seconds = round(time.perf_counter() - started, 1)
        result.models.append(analysis)
        if isinstance(entry, (str, Path)):
            del model
            gc.collect()
    return result


def _analyze_model(model, prompts, config: IntentionConfig, root: Path | None, progress: bool) -> ModelIntention:
    prompt_format = _resolve_format(model, config.prompt_format)
    name = model_id(model)
    cache = _model_cache(root, name, prompt_format, prompts, config)
    labellers = [Labeller(p.topics) for p in prompts]
    prompt_ids = [_prompt_ids(model, p.prompt, prompt_format) for p in prompts]
    _check_context(model, prompts, prompt_ids, config, prompt_format)
    group_names = sorted({p.group for p in prompts})
    groups = np.array([group_names.index(p.group) for p in prompts])
    stages = tqdm(total=4, desc=f"intention {name}", unit="stage", disable=not progress)
    timings, clock = {}, time.perf_counter()

    def done(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        stages.update(1)

    # 1. topic entropy at k = 0
    k0 = _sample_k0(model, prompt_ids, labellers, config, cache, progress)
    done("k0_sampling")
    per_row = [[r for r in k0 if r["row"] == i] for i in range(len(prompts))]
    rows = [_row_summary(p, recs) for p, recs in zip(prompts, per_row, strict=True)]
    estimate = _TopicEstimates(prompts, config)
    k0_labels = [[_label_of(r) for r in recs] for recs in per_row]
    at_k0 = _topic_entropy_at_k0(prompts, k0_labels, groups, estimate, config)

    # 2. commitment curve
    followups = _followup_rows(prompts, config.followup_phrasings)
    commitment = _commitment_curve(model, prompt_ids, per_row, rows, followups, groups, labellers, estimate, config,
                                   cache, progress)
    done("commitment")

    # 3. pre-response decoding
    readout = _readout(model, prompts, prompt_ids, rows, groups, config)
    done("readout")

    # 4. prefill violation
    prefill = _prefill(model, prompts, prompt_ids, rows, per_row, followups, groups, labellers, config, cache,
                       progress)
    done("prefill")
    stages.close()
    return ModelIntention(
        model_id=name, prompt_format=prompt_format, n_layers=int(model.cfg.n_layers), rows=rows, **at_k0,
        commitment=commitment, readout=readout, prefill=prefill, stage_seconds=timings,
    )


def _check_context(model, prompts: Sequence[IntentionPrompt], prompt_ids: list[list[int]], config: IntentionConfig,
                   prompt_format: str) -> None:
    """Refuse a prompt whose longest sequence would not fit the model's context."""
    name = model_id(model)
    # The longest sequence: prompt + a response (a prefilled start is part of one) + the prefill tokens.
    needed = config.max_new_tokens + config.prefill_tokens
    for p, ids in zip(prompts, prompt_ids, strict=True):
        if len(ids) + needed > int(model.cfg.n_ctx):
            raise ValueError(
                f"prompt {p.id!r} is {len(ids)} tokens in {name}'s {prompt_format} format; with max_new_tokens + "
                f"prefill_tokens = {needed} that exceeds its context of {int(model.cfg.n_ctx)} tokens (shorten or "
                "drop that prompt, or lower --max-new-tokens)"
            )
