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

>>> from surprise_probe.testing import tiny_hooked_transformer
>>> prompts = builtin_intention_prompts()[:4]
>>> result = analyze_intention([tiny_hooked_transformer(n_ctx=128)], prompts, n_samples=2, max_new_tokens=4,
...                            ks=(0, 1), prefill_tokens=2, n_boot=20, progress=False)
>>> result.models[0].topic_entropy["n_rows"], result.models[0].prompt_format
(4, 'chat')
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from surprise_probe.analyses.intention.plots import (
    commitment_figure,
    prefill_figure,
    readout_figure,
    topic_distribution_figure,
)
from surprise_probe.analyses.intention.topics import (
    AMBIGUOUS,
    OTHER,
    Labeller,
    TopicLabel,
    validate_lexicon,
)
from surprise_probe.core.forward.hooks import default_hooks
from surprise_probe.core.forward.metrics import output_entropy
from surprise_probe.core.forward.sampling import (
    PLAIN_FORMAT,
    Sampled,
    chat_prompt_ids,
    plain_prompt_ids,
    sample,
)
from surprise_probe.core.models.loading import EMBEDDED_MODELS, load_model, model_id
from surprise_probe.core.utils.jsonio import read_json, read_jsonl, software_versions, write_json
from surprise_probe.core.utils.plots import write_html
from surprise_probe.core.utils.stats import bootstrap_mean, bootstrap_nested
from surprise_probe.probes import cross_validate_classifier
from surprise_probe.probes.folds import assign_folds

__all__ = [
    "IntentionPrompt",
    "IntentionConfig",
    "ModelIntention",
    "IntentionResult",
    "read_intention_prompts",
    "builtin_intention_prompts",
    "analyze_intention",
    "topic_entropy",
    "PLAIN_FORMAT",
    "DEFAULT_KS",
]

DEFAULT_KS = (0, 1, 2, 4, 8, 16)
PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass(frozen=True)
class IntentionPrompt:
    """One phrasing of an open-ended prompt; phrasings of one prompt share ``group``."""

    id: str
    group: str
    prompt: str
    topics: dict[str, tuple[str, ...]]

    def to_dict(self) -> dict:
        return {"id": self.id, "group": self.group, "prompt": self.prompt,
                "topics": {k: list(v) for k, v in self.topics.items()}}


def read_intention_prompts(path: str | Path) -> list[IntentionPrompt]:
    """Read ``{"prompt", "topics", "group"?, "id"?}`` lines; ``"builtin"`` gives the built-in set.

    Errors name ``file:line``: a line that is not an object, an empty prompt, missing or malformed
    ``topics``, a duplicate ``id``. Without ``group`` a line is its own prompt group; without
    ``id`` its id is ``line<N>``.
    """
    if str(path) == "builtin":
        path = Path(str(resources.files("surprise_probe") / "data" / "intention.jsonl"))
    path = Path(path)
    prompts, seen = [], set()
    for number, value in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object with 'prompt' and 'topics', got {type(value).__name__}")
        prompt = value.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        if "topics" not in value:
            raise ValueError(f"{where}: prompt has no 'topics' (expected {{topic: [lowercase stems]}})")
        topics = validate_lexicon(value["topics"], where=where)
        ident = value.get("id", f"line{number}")
        group = value.get("group", ident)
        for key, item in (("id", ident), ("group", group)):
            if not isinstance(item, (str, int)) or isinstance(item, bool) or not str(item).strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {item!r}")
        if str(ident) in seen:
            raise ValueError(f"{where}: duplicate id {ident!r}")
        seen.add(str(ident))
        prompts.append(IntentionPrompt(str(ident), str(group), prompt, topics))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def builtin_intention_prompts() -> list[IntentionPrompt]:
    """The built-in set: 16 open-ended prompts x 3 phrasings over 6 shared topic lexicons."""
    return read_intention_prompts("builtin")


@dataclass(frozen=True)
class IntentionConfig:
    """Sizes and settings of one analysis (recorded with the results; the resume key)."""

    n_samples: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    ks: tuple[int, ...] = DEFAULT_KS
    followup_phrasings: int | None = 1
    prefill_tokens: int = 8
    prefill_samples: int = 4
    n_folds: int = 5
    n_shuffles: int = 5
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    batch_size: int = 32
    prompt_format: str = "auto"

    def __post_init__(self):
        checks = [
            (self.n_samples >= 2, f"n_samples must be >= 2 (an entropy needs several samples), got {self.n_samples}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (np.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0 (a topic distribution needs sampling), got {self.temperature}"),
            (len(self.ks) >= 1 and all(int(k) == k and k >= 0 for k in self.ks) and list(self.ks) == sorted(set(self.ks)),
             f"ks must be distinct non-negative integers in increasing order, got {list(self.ks)}"),
            (max(self.ks) < self.max_new_tokens,
             f"the largest k ({max(self.ks)}) must be below max_new_tokens ({self.max_new_tokens})"),
            (self.followup_phrasings is None or self.followup_phrasings >= 1,
             f"followup_phrasings must be >= 1 or None (all), got {self.followup_phrasings}"),
            (self.prefill_tokens >= 1, f"prefill_tokens must be >= 1, got {self.prefill_tokens}"),
            (self.prefill_samples >= 1, f"prefill_samples must be >= 1, got {self.prefill_samples}"),
            (self.n_folds >= 2, f"n_folds must be >= 2, got {self.n_folds}"),
            (self.n_shuffles >= 1, f"n_shuffles must be >= 1, got {self.n_shuffles}"),
            (self.n_boot >= 1, f"n_boot must be >= 1, got {self.n_boot}"),
            (0 < self.level < 1, f"level must be in (0, 1), got {self.level}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.prompt_format in PROMPT_FORMATS,
             f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# statistics


def topic_entropy(labels: Sequence[str]) -> float:
    """Plug-in entropy (nats) of a list of labels; buckets count as labels.

    >>> round(topic_entropy(["apple", "apple", "banana", "other"]), 4)
    1.0397
    """
    _, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _entropy_of_counts(counts: Float[np.ndarray, "boot labels"]) -> Float[np.ndarray, " boot"]:
    p = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(-1)


def _share_of_mode(counts: Float[np.ndarray, "boot labels"], is_topic: np.ndarray) -> Float[np.ndarray, " boot"]:
    topic_counts = np.where(is_topic, counts, 0)
    return topic_counts.max(-1) / counts.sum(-1)


def _nested_estimate(
    codes: Sequence[Int[np.ndarray, " n"]],
    groups: Int[np.ndarray, " rows"],
    statistic,
    n_labels: int,
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> dict:
    """Mean over rows of ``statistic(label counts of the row)``, CI over prompt groups and samples."""
    rows = [np.asarray(c, np.int64) for c in codes]

    def of_draws(draws: Int[np.ndarray, "boot n"]) -> Float[np.ndarray, " boot"]:
        counts = np.zeros((draws.shape[0], n_labels))
        np.add.at(counts, (np.repeat(np.arange(draws.shape[0]), draws.shape[1]), draws.reshape(-1)), 1.0)
        return statistic(counts)

    value, low, high, per_row = bootstrap_nested(of_draws, rows, groups, n_boot=n_boot, level=level, seed=seed)
    return {
        "value": value, "low": low, "high": high, "level": level,
        "n_rows": len(rows), "n_prompts": len(set(np.asarray(groups).tolist())),
        "n_samples": int(sum(len(c) for c in rows)), "per_row": per_row.tolist(),
    }


def _uniform_reference(n_topics: Sequence[int], n_samples: int, seed: int, n_draws: int = 2000) -> float:
    """Expected plug-in entropy of ``n_samples`` uniform draws over each row's topics (a ceiling)."""
    rng = np.random.default_rng(seed)
    values = []
    for n in sorted(set(n_topics)):
        draws = rng.integers(0, n, size=(n_draws, n_samples))
        counts = np.zeros((n_draws, n))
        np.add.at(counts, (np.repeat(np.arange(n_draws), n_samples), draws.reshape(-1)), 1.0)
        values.append((n, float(_entropy_of_counts(counts).mean())))
    lookup = dict(values)
    return float(np.mean([lookup[n] for n in n_topics]))


# ---------------------------------------------------------------------------------------------
# prompts, sampling, caching


def _resolve_format(model, requested: str) -> str:
    if requested != "auto":
        if requested == "chat" and not getattr(model.tokenizer, "chat_template", None):
            raise ValueError(f"model {model_id(model)!r} has no chat template; use prompt_format='plain'")
        return requested
    spec = EMBEDDED_MODELS.get(model_id(model))
    if spec is not None and not spec.post_trained:
        return "plain"
    return "chat" if getattr(model.tokenizer, "chat_template", None) else "plain"


def _prompt_ids(model, prompt: str, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        return [int(t) for t in chat_prompt_ids(model, prompt)]
    return [int(t) for t in plain_prompt_ids(model, prompt)]


def _text_ids(model, text: str) -> list[int]:
    return [int(t) for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]


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


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class ModelIntention:
    """Everything measured on one model (see the module docstring)."""

    model_id: str
    prompt_format: str
    n_layers: int
    rows: list[dict]
    topic_entropy: dict
    modal_share: dict
    bucket_shares: dict
    uniform_reference: float
    commitment: list[dict]
    readout: dict
    prefill: dict
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IntentionResult:
    """The analysis of one or more models on one prompt set; ``save(folder)`` writes JSON + HTML."""

    config: dict
    prompts: list[dict]
    models: list[ModelIntention] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "analysis": "intention",
            "config": self.config,
            "n_prompts": len({p["group"] for p in self.prompts}),
            "n_phrasings": len(self.prompts),
            "prompts": self.prompts,
            "models": [m.to_dict() for m in self.models],
            "software_versions": software_versions(),
        }

    def save(self, folder: str | Path) -> dict[str, Path]:

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": write_json(folder / "intention.json", self.to_dict())}
        figures = {
            "topics": topic_distribution_figure(self),
            "commitment": commitment_figure(self),
            "readout": readout_figure(self),
            "prefill": prefill_figure(self),
        }
        for name, figure in figures.items():
            paths[name] = write_html(figure, folder / f"intention_{name}.html")
        return paths

    def summary(self) -> str:
        """A few lines per model: the headline numbers with CIs and sizes."""
        lines = []
        for m in self.models:
            te, ms = m.topic_entropy, m.modal_share
            lines.append(f"{m.model_id} ({m.prompt_format} format, {te['n_prompts']} prompts, "
                         f"{te['n_rows']} phrasings, {te['n_samples']} samples; {m.seconds:.0f} s: "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in m.stage_seconds.items()) + ")")
            lines.append(f"  topic entropy at k=0: {te['value']:.3f} [{te['low']:.3f}, {te['high']:.3f}] nats "
                         f"(uniform over the lexicon, same n: {m.uniform_reference:.3f}); modal share "
                         f"{ms['value']:.2f} [{ms['low']:.2f}, {ms['high']:.2f}]; other {m.bucket_shares['other']:.2f}")
            curve = ", ".join(f"k={c['k']}: {c['value']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
                              for c in m.commitment if c.get("value") is not None)
            lines.append(f"  commitment: {curve}")
            probe = m.readout.get("probe")
            if probe:
                best = max(probe, key=lambda row: row["accuracy"])
                shuffled = m.readout["shuffled"][probe.index(best)]
                lines.append(f"  probe (best depth {best['depth']}): accuracy {best['accuracy']:.2f} "
                             f"[{best['low']:.2f}, {best['high']:.2f}] vs shuffled {shuffled['accuracy']:.2f}, "
                             f"majority {best['majority']:.2f} ({m.readout['n_rows']} phrasings)")
            else:
                lines.append(f"  probe: not fitted ({m.readout.get('skipped')})")
            p = m.prefill
            if p.get("difference"):
                d = p["difference"]
                lines.append(f"  prefill: other - own = {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] nats "
                             f"({p['n_pairs']} pairs, other higher in {p['n_other_higher']})")
            else:
                lines.append(f"  prefill: not measured ({p.get('skipped')})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the analysis


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
    cache = _Cache(None if root is None else root / _slug(name), {
        "model": name, "format": prompt_format, "prompts": [p.to_dict() for p in prompts],
        **{k: v for k, v in config.to_dict().items() if k not in ("n_boot", "level", "n_folds", "n_shuffles", "batch_size")},
    })
    labellers = [Labeller(p.topics) for p in prompts]
    prompt_ids = [_prompt_ids(model, p.prompt, prompt_format) for p in prompts]
    # The longest sequence: prompt + a response (a prefilled start is part of one) + the prefill tokens.
    needed = config.max_new_tokens + config.prefill_tokens
    for p, ids in zip(prompts, prompt_ids, strict=True):
        if len(ids) + needed > int(model.cfg.n_ctx):
            raise ValueError(
                f"prompt {p.id!r} is {len(ids)} tokens in {name}'s {prompt_format} format; with max_new_tokens + "
                f"prefill_tokens = {needed} that exceeds its context of {int(model.cfg.n_ctx)} tokens (shorten or "
                "drop that prompt, or lower --max-new-tokens)"
            )
    group_names = sorted({p.group for p in prompts})
    groups = np.array([group_names.index(p.group) for p in prompts])
    stages = tqdm(total=4, desc=f"intention {name}", unit="stage", disable=not progress)
    timings, clock = {}, time.perf_counter()

    def done(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        stages.update(1)

    # 1. k = 0 samples
    k0 = cache.get("k0")
    if k0 is None:
        samples = sample(model, prompt_ids, n_samples=config.n_samples, max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, seed=config.seed, batch_size=config.batch_size,
                         progress=progress)
        k0 = _sample_records(model, samples, lambda s: labellers[s.prompt_index])
        cache.put("k0", k0)
    done("k0_sampling")
    per_row = [[r for r in k0 if r["row"] == i] for i in range(len(prompts))]
    rows = [_row_summary(p, recs) for p, recs in zip(prompts, per_row, strict=True)]
    codebook = sorted({*(t for p in prompts for t in p.topics), AMBIGUOUS, OTHER})
    is_topic = np.array([c not in (AMBIGUOUS, OTHER) for c in codebook])

    def estimate(label_lists, row_groups, statistic, seed_offset=0):
        codes = [np.array([codebook.index(label) for label in labels]) for labels in label_lists]
        return _nested_estimate(codes, row_groups, statistic, len(codebook), n_boot=config.n_boot,
                                level=config.level, seed=config.seed + seed_offset)

    k0_labels = [[_label_of(r) for r in recs] for recs in per_row]
    entropy_k0 = estimate(k0_labels, groups, _entropy_of_counts)
    modal = estimate(k0_labels, groups, lambda c: _share_of_mode(c, is_topic), 1)
    all_labels = [label for labels in k0_labels for label in labels]
    buckets = {b: float(np.mean([label == b for label in all_labels])) for b in (OTHER, AMBIGUOUS)}
    uniform = _uniform_reference([len(p.topics) for p in prompts], config.n_samples, config.seed)

    # 2. commitment curve
    followups = _followup_rows(prompts, config.followup_phrasings)
    commitment = [{"k": 0, **{k: v for k, v in estimate([k0_labels[i] for i in followups], groups[followups],
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
        model_id=name, prompt_format=prompt_format, n_layers=int(model.cfg.n_layers), rows=rows,
        topic_entropy={k: v for k, v in entropy_k0.items() if k != "per_row"},
        modal_share={k: v for k, v in modal.items() if k != "per_row"},
        bucket_shares=buckets, uniform_reference=uniform, commitment=commitment, readout=readout,
        prefill=prefill, stage_seconds=timings,
    )


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


def _followup_rows(prompts, per_group: int | None) -> list[int]:
    taken: dict[str, int] = {}
    rows = []
    for i, p in enumerate(prompts):
        if per_group is None or taken.get(p.group, 0) < per_group:
            taken[p.group] = taken.get(p.group, 0) + 1
            rows.append(i)
    return rows


def _reference(records: list[dict], modal_topic: str | None) -> dict:
    """The first sample naming the modal topic (else the first sample): the revealed response."""
    for r in records:
        if modal_topic is not None and _label_of(r) == modal_topic:
            return r
    return records[0]


def _content(record: dict) -> list[int]:
    return record["response_ids"][:-1] if record["ended"] else list(record["response_ids"])


def _mention_token(model, record: dict, labeller: Labeller) -> int | None:
    """How many response tokens it takes until the text names its topic (None: never)."""
    ids = _content(record)
    for j in range(1, len(ids) + 1):
        if labeller(model.tokenizer.decode(ids[:j])).is_topic:
            return j
    return None


# ---------------------------------------------------------------------------------------------
# pre-response decoding


def _hooks(model) -> list[str]:
    return default_hooks(model)


@torch.inference_mode()
def _last_token_residuals(model, prompt_ids: list[list[int]]) -> Float[np.ndarray, "rows depth d_model"]:
    hooks = _hooks(model)
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        _, cache = model.run_with_cache(torch.tensor([ids], device=device), names_filter=lambda n: n in hooks)
        out.append(torch.stack([cache[h][0, -1] for h in hooks]).float().cpu().numpy())
        del cache
    return np.stack(out)


def _topic_token_ids(model, topic: str) -> list[int]:
    name = topic.replace("_", " ")
    ids = set()
    for form in (name, " " + name, name.capitalize(), " " + name.capitalize()):
        tokens = _text_ids(model, form)
        if tokens:
            ids.add(tokens[0])
    return sorted(ids)


@torch.inference_mode()
def _logit_lens(model, residuals: np.ndarray, prompts, rows, config: IntentionConfig) -> dict:
    """Per depth: accuracy of the topic whose first tokens get the most logit, vs the modal topic."""
    device = next(model.parameters()).device
    usable = [i for i, row in enumerate(rows) if row["modal_topic"] is not None]
    topic_ids = {t: _topic_token_ids(model, t) for p in prompts for t in p.topics}
    n_depths = residuals.shape[1]
    correct = np.zeros((n_depths, len(usable)))
    prob_of_mode = np.zeros((n_depths, len(usable)))
    predicted = np.empty((n_depths, len(usable)), dtype=object)
    for j, i in enumerate(usable):
        resid = torch.tensor(residuals[i], device=device, dtype=next(model.parameters()).dtype)[:, None]
        log_probs = torch.log_softmax(model.unembed(model.ln_final(resid))[:, 0].float(), -1)
        names = list(prompts[i].topics)
        scores = torch.stack([torch.logsumexp(log_probs[:, topic_ids[t]], -1) for t in names], -1)
        within = torch.softmax(scores, -1).cpu().numpy()
        mode = names.index(rows[i]["modal_topic"])
        correct[:, j] = within.argmax(-1) == mode
        prob_of_mode[:, j] = within[:, mode]
        predicted[:, j] = [names[a] for a in within.argmax(-1)]
    if not usable:
        return {"accuracy": [], "prob_of_mode": [], "shuffled_accuracy": [], "chance": None,
                "topic_token_ids": topic_ids}
    shuffled = np.zeros((config.n_shuffles, n_depths))
    modal = np.array([rows[i]["modal_topic"] for i in usable], dtype=object)
    lexicons = [tuple(prompts[i].topics) for i in usable]
    for s in range(config.n_shuffles):
        permuted = _shuffle_within(modal, lexicons, config.seed + 100 + s)
        shuffled[s] = (predicted == permuted[None]).mean(1)
    return {
        "accuracy": correct.mean(1).tolist(),
        "prob_of_mode": prob_of_mode.mean(1).tolist(),
        "shuffled_accuracy": shuffled.mean(0).tolist(),
        "chance": float(np.mean([1 / len(prompts[i].topics) for i in usable])),
        "topic_token_ids": topic_ids,
    }


def _shuffle_within(labels: np.ndarray, blocks: Sequence, seed: int) -> np.ndarray:
    """A permutation of ``labels`` within rows sharing a block (here: the same topic lexicon)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for block in dict.fromkeys(blocks):
        idx = np.array([i for i, b in enumerate(blocks) if b == block])
        out[idx] = labels[idx[rng.permutation(len(idx))]]
    return out


def _readout(model, prompts, prompt_ids, rows, groups, config: IntentionConfig) -> dict:
    residuals = _last_token_residuals(model, prompt_ids)
    depths = list(range(residuals.shape[1]))
    result = {"depths": depths, "hooks": _hooks(model),
              "logit_lens": _logit_lens(model, residuals, prompts, rows, config)}
    usable = [i for i, row in enumerate(rows) if row["modal_topic"] is not None]
    labels = np.array([rows[i]["modal_topic"] for i in usable], dtype=object)
    # A topic the probe can learn across prompts must be the mode of at least two prompt groups.
    groups_of = {t: {groups[i] for i, label in zip(usable, labels, strict=True) if label == t} for t in set(labels)}
    keep = [j for j, label in enumerate(labels) if len(groups_of[label]) >= 2]
    rows_used = [usable[j] for j in keep]
    labels = labels[keep].astype(str)
    row_groups = groups[rows_used]
    n_folds = min(config.n_folds, len(set(row_groups)))
    result.update({"n_rows": len(rows_used), "n_prompts": len(set(row_groups)), "n_folds": n_folds,
                   "classes": sorted(set(labels)), "rows": [prompts[i].id for i in rows_used]})
    if len(set(labels)) < 2 or n_folds < 2:
        result["skipped"] = (f"{len(set(labels))} modal topic(s) shared by >= 2 prompts over {len(set(row_groups))} "
                             "prompt(s); the probe needs 2 classes and 2 prompt groups")
        return result
    lexicons = [tuple(prompts[i].topics) for i in rows_used]
    probe, shuffled, lexicon_majority = [], [], []
    folds = assign_folds(row_groups, n_folds, config.seed)
    for depth in depths:
        X = residuals[rows_used, depth].astype(np.float64)
        try:
            real = cross_validate_classifier(X, labels, row_groups, n_folds=n_folds, seed=config.seed,
                                             n_boot=config.n_boot)
        except ValueError as error:  # a training fold with one class: report instead of failing
            result["skipped"] = f"probe at depth {depth}: {error}"
            return result
        controls = []
        for s in range(config.n_shuffles):
            permuted = _shuffle_within(labels.astype(object), lexicons, config.seed + 200 + s).astype(str)
            try:
                controls.append(cross_validate_classifier(X, permuted, row_groups, n_folds=n_folds, seed=config.seed,
                                                          n_boot=10)["accuracy"].value)
            except ValueError:
                continue
        acc, majority = real["accuracy"], real["majority_accuracy"]
        probe.append({"depth": depth, "accuracy": acc.value, "low": acc.low, "high": acc.high,
                      "majority": majority.value})
        shuffled.append({"depth": depth, "accuracy": float(np.mean(controls)) if controls else None,
                         "values": controls,
                         "p_value": (1 + sum(c >= acc.value for c in controls)) / (1 + len(controls))})
    for fold in range(n_folds):
        lexicon_majority.append(_lexicon_majority_hits(labels, lexicons, folds, fold))
    result.update({"probe": probe, "shuffled": shuffled,
                   "lexicon_majority": float(np.concatenate(lexicon_majority).mean())})
    return result


def _lexicon_majority_hits(labels, lexicons, folds, fold) -> np.ndarray:
    """Baseline: predict the training fold's most frequent topic among rows with the same lexicon."""
    train, test = folds != fold, np.flatnonzero(folds == fold)
    hits = []
    for j in test:
        same = [i for i in np.flatnonzero(train) if lexicons[i] == lexicons[j]]
        if not same:
            hits.append(0.0)
            continue
        values, counts = np.unique(labels[same], return_counts=True)
        hits.append(float(values[np.argmax(counts)] == labels[j]))
    return np.array(hits)


# ---------------------------------------------------------------------------------------------
# prefill violation


def _replacement(word: str, matched: str) -> str:
    word = word.replace("_", " ")
    if matched[:1].isupper():
        word = word[:1].upper() + word[1:]
    if matched.lower().endswith("s") and not word.lower().endswith("s"):
        word += "s"  # keep a plural a plural ("apples" -> "bananas")
    return word


def _prefill_pair(model, prompt: IntentionPrompt, labeller: Labeller, record: dict, seed: int) -> dict | None:
    """The own-topic start of ``record`` and an equally long (in tokens) start naming another topic.

    The other start replaces the matched word by another topic's name, or, only when its own stems do
    not match the name (e.g. a topic ``"city_1"`` with stems ``["paris"]``), by one of its stems.
    """
    label = TopicLabel(**{**record["label"], "candidates": tuple(record["label"]["candidates"])})
    text = unicodedata.normalize("NFC", record["text"])
    own_text = text[: label.start + len(label.matched)]
    own_ids = _text_ids(model, own_text)
    others = [t for t in prompt.topics if t != label.label]
    order = np.random.default_rng(seed).permutation(len(others))
    for o in order:
        # Stems (often not whole words, like "strawberr") only when the name itself is not labelled.
        named = labeller(_replacement(others[o], label.matched)).label == others[o]
        for word in [others[o]] if named else list(prompt.topics[others[o]]):
            other_text = text[: label.start] + _replacement(word, label.matched)
            other_ids = _text_ids(model, other_text)
            if len(other_ids) == len(own_ids) and labeller(other_text).label == others[o]:
                return {"own_topic": label.label, "other_topic": others[o], "own_start": own_text,
                        "other_start": other_text, "own_ids": own_ids, "other_ids": other_ids}
    return None


@torch.inference_mode()
def _mean_entropy_after(model, sequences: list[list[int]], starts: list[int], n_read: list[int],
                        batch_size: int) -> list[float]:
    """Mean output entropy at positions ``start-1 .. start-1+n-1`` (the next ``n`` tokens' distributions)."""
    device = next(model.parameters()).device
    pad = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    means = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        width = max(len(s) for s in chunk)
        # Right padding: causal attention means the real positions never see the pads.
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids, device=device)
        logits = model(tokens)
        for row in range(len(chunk)):
            start, n = starts[begin + row], n_read[begin + row]
            entropy = output_entropy(logits[row : row + 1, start - 1 : start - 1 + n])
            means.append(float(entropy.mean()))
        del logits
    return means


def _prefill(model, prompts, prompt_ids, rows, per_row, followups, groups, labellers, config, cache, progress) -> dict:
    pairs = {}
    skipped = {"no_modal_topic": 0, "no_equal_length_alternative": 0}
    for i in followups:
        modal_topic = rows[i]["modal_topic"]
        if modal_topic is None:
            skipped["no_modal_topic"] += 1
            continue
        record = _reference(per_row[i], modal_topic)
        pair = _prefill_pair(model, prompts[i], labellers[i], record, config.seed + i)
        if pair is None:
            skipped["no_equal_length_alternative"] += 1
            continue
        pairs[i] = pair
    if not pairs:
        return {"skipped": f"no usable prompt ({skipped})", **skipped, "n_pairs": 0}
    order = sorted(pairs)
    stage_data = cache.get("prefill")
    if stage_data is None:
        starts = [prompt_ids[i] + pairs[i][side] for i in order for side in ("own_ids", "other_ids")]
        samples = sample(model, starts, n_samples=config.prefill_samples, max_new_tokens=config.prefill_tokens,
                         temperature=config.temperature, seed=config.seed + 1000, batch_size=config.batch_size,
                         progress=progress)
        sequences = [s.token_ids for s in samples]
        entropies = _mean_entropy_after(model, sequences, [len(s.prompt_ids) for s in samples],
                                        [len(s.response_ids) for s in samples], max(1, config.batch_size // 4))
        stage_data = [{"start": s.prompt_index, "sample": s.sample_index, "response_ids": s.response_ids,
                       "text": s.text(model.tokenizer), "mean_entropy": e} for s, e in zip(samples, entropies, strict=True)]
        cache.put("prefill", stage_data)
    own, other = [], []
    for n, i in enumerate(order):
        for side, bucket in ((0, own), (1, other)):
            values = [r["mean_entropy"] for r in stage_data if r["start"] == 2 * n + side]
            bucket.append(float(np.mean(values)))
        pairs[i].update({"own_entropy": own[-1], "other_entropy": other[-1], "id": prompts[i].id,
                         "continuations": {
                             side: [r["text"] for r in stage_data if r["start"] == 2 * n + k]
                             for k, side in enumerate(("own", "other"))}})
    own, other = np.array(own), np.array(other)
    pair_groups = groups[order]

    def ci(values):
        return bootstrap_mean(values, pair_groups, n_boot=config.n_boot, level=config.level, seed=config.seed).to_dict()

    return {
        "n_pairs": len(order), "n_prompts": len(set(pair_groups)), **skipped,
        "prefill_tokens": config.prefill_tokens, "samples_per_start": config.prefill_samples,
        "own": ci(own), "other": ci(other), "difference": ci(other - own),
        "n_other_higher": int((other > own).sum()),
        "pairs": [{k: v for k, v in pairs[i].items() if not k.endswith("_ids")} for i in order],
    }
