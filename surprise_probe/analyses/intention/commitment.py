"""Topic entropy at k = 0 and the commitment curve: how settled a model's topic is before it writes,
and with the first k tokens of a reference response revealed.

Every row (one phrasing of a prompt) is labelled from its samples; the modal topic of a row and its
reference response (a sample naming that topic) come from the k = 0 samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from surprise_probe.analyses.intention.config import IntentionConfig
from surprise_probe.analyses.intention.prompts import IntentionPrompt
from surprise_probe.analyses.intention.samples import (
    _Cache,
    _content,
    _label_of,
    _reference,
    _sample_records,
)
from surprise_probe.analyses.intention.statistics import (
    _entropy_of_counts,
    _nested_estimate,
    _share_of_mode,
    _uniform_reference,
    topic_entropy,
)
from surprise_probe.analyses.intention.topics import AMBIGUOUS, OTHER, Labeller
from surprise_probe.core.forward.sampling import sample


def _sample_k0(model, prompt_ids: list[list[int]], labellers: list[Labeller], config: IntentionConfig,
               cache: _Cache, progress: bool) -> list[dict]:
    """``n_samples`` labelled responses per row with nothing revealed (the cached stage ``k0``)."""
    k0 = cache.get("k0")
    if k0 is None:
        samples = sample(model, prompt_ids, n_samples=config.n_samples, max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, seed=config.seed, batch_size=config.batch_size,
                         progress=progress)
        k0 = _sample_records(model, samples, lambda s: labellers[s.prompt_index])
        cache.put("k0", k0)
    return k0


def _row_summary(prompt: IntentionPrompt, records: list[dict]) -> dict:
    labels = [_label_of(r) for r in records]
    counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
    topic_counts = {t: c for t, c in counts.items() if t in prompt.topics}
    # Ties between topics go to the one sampled first (dict order), so the mode is deterministic.
    modal_topic = max(topic_counts, key=topic_counts.get) if topic_counts else None
    return {
        "id": prompt.id, "group": prompt.group, "n_topics": len(prompt.topics), "counts": counts,
        "entropy": topic_entropy(labels), "modal_topic": modal_topic,
        "modal_share": topic_counts[modal_topic] / len(labels) if modal_topic else 0.0,
        "samples": [{"text": r["text"], "label": r["label"]} for r in records],
    }


class _TopicEstimates:
    """Nested-bootstrap estimates of a statistic of label counts, with every label coded in one codebook
    (all prompts' topics and the two buckets); an estimate's seed is ``config.seed`` plus its offset."""

    def __init__(self, prompts: Sequence[IntentionPrompt], config: IntentionConfig):
        self.codebook = sorted({*(t for p in prompts for t in p.topics), AMBIGUOUS, OTHER})
        self.is_topic = np.array([c not in (AMBIGUOUS, OTHER) for c in self.codebook])
        self.config = config

    def __call__(self, label_lists, row_groups, statistic, seed_offset: int = 0) -> dict:
        codes = [np.array([self.codebook.index(label) for label in labels]) for labels in label_lists]
        return _nested_estimate(codes, row_groups, statistic, len(self.codebook), n_boot=self.config.n_boot,
                                level=self.config.level, seed=self.config.seed + seed_offset)


def _topic_entropy_at_k0(prompts: Sequence[IntentionPrompt], k0_labels: list[list[str]], groups: np.ndarray,
                         estimate: _TopicEstimates, config: IntentionConfig) -> dict:
    """Topic entropy and modal share at k = 0 (with CIs), the buckets' shares and the uniform reference
    (the :class:`ModelIntention` fields of those names)."""
    entropy_k0 = estimate(k0_labels, groups, _entropy_of_counts)
    modal = estimate(k0_labels, groups, lambda c: _share_of_mode(c, estimate.is_topic), 1)
    all_labels = [label for labels in k0_labels for label in labels]
    buckets = {b: float(np.mean([label == b for label in all_labels])) for b in (OTHER, AMBIGUOUS)}
    uniform = _uniform_reference([len(p.topics) for p in prompts], config.n_samples, config.seed)
    return {
        "topic_entropy": {k: v for k, v in entropy_k0.items() if k != "per_row"},
        "modal_share": {k: v for k, v in modal.items() if k != "per_row"},
        "bucket_shares": buckets,
        "uniform_reference": uniform,
    }


def _followup_rows(prompts, per_group: int | None) -> list[int]:
    taken: dict[str, int] = {}
    rows = []
    for i, p in enumerate(prompts):
        if per_group is None or taken.get(p.group, 0) < per_group:
            taken[p.group] = taken.get(p.group, 0) + 1
            rows.append(i)
    return rows


def _mention_token(model, record: dict, labeller: Labeller) -> int | None:
    """How many response tokens it takes until the text names its topic (None: never)."""
    ids = _content(record)
    for j in range(1, len(ids) + 1):
        if labeller(model.tokenizer.decode(ids[:j])).is_topic:
            return j
    return None


def _commitment_curve(model, prompt_ids: list[list[int]], per_row: list[list[dict]], rows: list[dict],
                      followups: list[int], groups: np.ndarray, labellers: list[Labeller],
                      estimate: _TopicEstimates, config: IntentionConfig, cache: _Cache, progress: bool) -> list[dict]:
    """Topic entropy of the follow-up rows at each k, the k > 0 continuations sampled (stages ``commit_k<k>``).

    Each follow-up row gets its reference response in ``rows[i]["reference"]``.
    """
    k0_labels = [[_label_of(r) for r in per_row[i]] for i in followups]
    commitment = [{"k": 0, **{k: v for k, v in estimate(k0_labels, groups[followups],
                                                        _entropy_of_counts, 2).items() if k != "per_row"}}]
    references = {i: _reference(per_row[i], rows[i]["modal_topic"]) for i in followups}
    for i in followups:
        rows[i]["reference"] = {"sample": references[i]["sample"], "text": references[i]["text"],
                                "label": references[i]["label"],
                                "mention_token": _mention_token(model, references[i], labellers[i])}
    for k in config.ks:
        if k == 0:
            continue
        usable = [i for i in followups if len(_content(references[i])) >= k]
        stage = f"commit_k{k}"
        records = cache.get(stage)
        if records is None:
            starts = [prompt_ids[i] + _content(references[i])[:k] for i in usable]
            samples = sample(model, starts, n_samples=config.n_samples, max_new_tokens=config.max_new_tokens - k,
                             temperature=config.temperature, seed=config.seed + k, batch_size=config.batch_size,
                             progress=progress) if starts else []
            records = _sample_records(
                model, samples, lambda s, usable=usable: labellers[usable[s.prompt_index]],
                prefix_of=lambda s, usable=usable, k=k: _content(references[usable[s.prompt_index]])[:k],
            )
            for r in records:
                r["row"] = usable[r["row"]]
            cache.put(stage, records)
        if usable:
            labels = [[_label_of(r) for r in records if r["row"] == i] for i in usable]
            point = estimate(labels, groups[usable], _entropy_of_counts, 2 + k)
            point.pop("per_row")
            commitment.append({"k": k, **point, "n_references_too_short": len(followups) - len(usable)})
        else:
            commitment.append({"k": k, "value": None, "n_rows": 0, "n_references_too_short": len(followups)})
    return commitment
