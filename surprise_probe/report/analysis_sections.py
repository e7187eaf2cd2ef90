"""Report sections for the analyses: the token view, the policy gap and cached intention.

:func:`token_view_section` reads ``token_view.json``, :func:`gap_section` ``gap.json`` and
:func:`intention_section` ``intention.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from pathlib import Path

from surprise_probe.analyses.intention.plots import (
    commitment_figure,
    prefill_figure,
    readout_figure,
    readout_skip_reason,
)
from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.analyses.policy.plots import describe_source
from surprise_probe.analyses.token_view import token_view_html
from surprise_probe.core.utils.jsonio import read_json
from surprise_probe.core.utils.stats import small_sample_warnings
from surprise_probe.report.values import Number, StageSection, _ci, _fmt

__all__ = ["token_view_section", "gap_section", "intention_section"]


def token_view_section(source, element_id: str = "token-view") -> StageSection:
    """From ``token_view.json`` (or a ``TokenViewData``): the conversation as coloured text."""

    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "token_view.json" if path.is_dir() else path
        data = read_json(path)
    else:
        data = source.to_dict()
    n = f"{len(data['tokens'])} tokens shown of {data['n_tokens_total']}, {sum(data['scored'])} scored"
    return StageSection(
        "token_view", "Token view: one conversation, token by token",
        caption=("Each token coloured by the chosen quantity; the layer menu recolours the layer-dependent ones "
                 "(decoded surprise, attribution) in place.<br>Hover a token for every value and the model's top-5 "
                 "next tokens; underlined tokens are the scored span."),
        fragments=[token_view_html(data, element_id=element_id)], json_paths=[path] if path else [], sample=n,
    )


class _SavedGap:
    """A saved ``gap.json`` with the attributes the policy-gap figures read."""

    def __init__(self, data: Mapping):
        self.data, self.models, self.summary, self.config = data, data["models"], data["summary"], data["config"]

    def to_dict(self) -> Mapping:
        return self.data


def _source_order(source: str) -> tuple[int, str]:
    """Another model's answer first (the cleanest off-policy text), then human, then the prompt-fit control."""
    return ({"human": 1, "own_other_prompt": 2}.get(source, 0 if source.startswith("writer:") else 3), source)


def gap_section(folder: str | Path) -> StageSection:
    """From ``gap.json``: each reader's off/on-policy entropy ratio per source, every source label
    explained where it appears (the measure, the caption, the figures' legends)."""

    path = Path(folder) / "gap.json"
    data = read_json(path)
    k = data["config"]["k"]
    kinds = {m["name"]: ("post-trained" if m["post_trained"] else "base" if m["post_trained"] is False else "")
             for m in data["models"]}
    rows = [r for r in data["summary"]["comparisons"] if r["span"].get("n_prompts")]
    numbers = []
    for m in data["models"]:
        fmt = m.get("sampling_format") if m.get("sampling_format") in m["formats_read"] else (
            "assistant" if "assistant" in m["formats_read"] else m["formats_read"][0])
        mine = sorted([r for r in rows if r["reader"] == m["name"] and r["format"] == fmt],
                      key=lambda r: _source_order(r["source"]))
        for row in mine:
            ratio, auroc = row["span"]["ratio_off_on"], row.get("auroc_entropy") or {}
            others = [r for r in rows if r["reader"] != m["name"] and r["source"] == row["source"]]
            controls = [f"{r['reader']} ({kinds.get(r['reader']) or 'kind unknown'}, {r['format']}): "
                        f"{_fmt(r['span']['ratio_off_on']['value'])}" for r in others[:1]]
            plain = [r for r in rows if r["reader"] == m["name"] and r["source"] == row["source"]
                     and r["format"] == "plain" and fmt != "plain"]
            controls += [f"plain format (formatting control): {_fmt(r['span']['ratio_off_on']['value'])}" for r in plain]
            controls.append(f"AUROC own vs this source {_fmt(auroc.get('auroc'))} [{_fmt(auroc.get('low'))}, "
                            f"{_fmt(auroc.get('high'))}]")
            controls.append(detector_comparison(row))
            controls += [f"caveat: {note}" for note in small_sample_warnings(units=row["span"]["n_prompts"],
                                                                             unit_name="prompts")]
            numbers.append(Number(
                f"{m['name']} ({kinds[m['name']] or 'kind unknown'}, {fmt} format) reading "
                f"{describe_source(row['source'])}: mean entropy off / on (its own answers)", ratio["value"],
                _ci(ratio), control="; ".join(controls), n=f"{row['span']['n_prompts']} prompts"))
    n = f"{data['n_prompts']} prompts, {data['config']['n_samples']} sample(s) each, readers " + ", ".join(
        f"{m['name']} ({kinds[m['name']] or '?'})" for m in data["models"])
    curve = data["summary"].get("temperature_curve") or []
    for point in curve:
        if point.get("ratio") is None:
            continue
        own = point.get("mean_entropy_own") or {}
        numbers.append(Number(
            f"{point['reader']} ({point['format']} format) reading {describe_source(point['source'])}: off / on with "
            f"its own answers sampled at temperature {point['temperature']:g}", point["ratio"],
            tuple(point["ci"]) if point.get("ci") else None,
            control=f"own answers' mean entropy {_fmt(own.get('mean'))} [{_fmt(own.get('low'))}, "
                    f"{_fmt(own.get('high'))}] nats",
            n=f"{point['n']} prompts"))
    saved = _SavedGap(data)
    figures = [policy_plots.gap_ratios(saved), policy_plots.reader_writer_heatmap(saved),
               policy_plots.entropy_by_position(saved)]
    if any(key.startswith("auroc_") and key != "auroc_entropy" for r in rows for key in r):
        figures.append(policy_plots.detector_aurocs(saved))
    if curve:
        figures.append(policy_plots.temperature_curve(saved))
    sources = sorted({c["source"] for c in data["summary"]["cells"]}, key=lambda s: (s != "own", _source_order(s)))
    glossary = "; ".join(f"<code>{escape(source)}</code>: {escape(policy_plots.SOURCE_DESCRIPTIONS.get(source, ''))}"
                         if not source.startswith("writer:") else escape(policy_plots.describe_source(source))
                         for source in sources)
    return StageSection(
        "gap", "Policy gap: on-policy vs off-policy entropy",
        caption=("Each reader's mean output entropy on another source's text divided by its entropy on its own sampled "
                 f"answers (95% paired bootstrap CI over prompts; first {k} tokens in the JSON).<br>"
                 "1 = no gap; the claim is a ratio well above 1 for a post-trained reader and near 1 for a base "
                 f"reader; the plain format is the formatting control.<br>Sources: {glossary}.<br>"
                 "Detectors: the AUROC of own vs each source for the entropy signature and for zero-shot detectors "
                 "of model-written text computed by the same reader (log-likelihood, log-rank, Fast-DetectGPT, "
                 "Binoculars where two readers share a tokenizer); the rule beside each number: entropy is 'better' "
                 "or 'worse' than the best other detector only where their CIs do not overlap. Temperature curve: "
                 "the off/on ratio with the reader's own answers sampled at each temperature; a ratio that crosses "
                 "1 as the temperature rises makes a reversal at T = 1 a sampling artefact."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path], sample=n,
    )


def detector_comparison(row: Mapping) -> str:
    """The entropy signature against the best other zero-shot detector of one comparison, by a stated
    rule: 'better' / 'worse' only where the two AUROC CIs do not overlap, else 'not distinguishable'.

    >>> row = {"auroc_entropy": {"auroc": 0.55, "low": 0.4, "high": 0.7},
    ...        "auroc_fast_detectgpt": {"auroc": 0.95, "low": 0.9, "high": 1.0, "available": True}}
    >>> detector_comparison(row)
    'entropy AUROC 0.550 [0.400, 0.700] worse than Fast-DetectGPT 0.950 [0.900, 1.000] (CIs apart)'
    """
    entropy = row.get("auroc_entropy") or {}
    others = {key[len("auroc_"):]: value for key, value in row.items()
              if key.startswith("auroc_") and key != "auroc_entropy" and isinstance(value, Mapping)
              and value.get("available", True) and value.get("auroc") is not None}
    if entropy.get("auroc") is None or not others:
        return "no other detector to compare with"
    name, best = max(others.items(), key=lambda item: item[1]["auroc"])
    title = policy_plots.detector_title(name)
    if entropy["low"] > best["high"]:
        verdict = "better than"
    elif entropy["high"] < best["low"]:
        verdict = "worse than"
    else:
        verdict = "not distinguishable from"
    apart = " (CIs apart)" if verdict != "not distinguishable from" else " (CIs overlap)"
    return (f"entropy AUROC {_fmt(entropy['auroc'])} [{_fmt(entropy['low'])}, {_fmt(entropy['high'])}] {verdict} "
            f"{title} {_fmt(best['auroc'])} [{_fmt(best['low'])}, {_fmt(best['high'])}]{apart}")


def intention_section(folder: str | Path) -> StageSection:
    """From ``intention.json``: topic entropy before the first token (beside how many samples name
    no topic, which a low entropy can mean instead of a choice), commitment, readout, prefill."""

    path = Path(folder) / "intention.json"
    data = read_json(path)
    numbers = []
    for m in data["models"]:
        te = m["topic_entropy"]
        n = f"{te['n_prompts']} prompt groups, {te['n_rows']} phrasings, {te['n_samples']} samples in all"
        small = [f"caveat: {note}" for note in small_sample_warnings(units=te["n_prompts"], unit_name="prompt groups")]
        shares = m.get("bucket_shares") or {}
        unnamed = float(shares.get("other") or 0) + float(shares.get("ambiguous") or 0)
        reading = (f"{unnamed:.0%} of the samples name no lexicon topic (the 'other' bucket), so a low entropy here "
                   "says they name nothing, not that one topic was chosen" if unnamed > 0.5 else
                   f"{unnamed:.0%} of the samples name no lexicon topic")
        numbers.append(Number(f"{m['model_id']}: topic entropy at k = 0 (before the first token)", te["value"], _ci(te),
                              control="; ".join([f"uniform over the lexicon, same n: {_fmt(m['uniform_reference'])}",
                                                 reading, *small]), n=n, unit="nats"))
        if m.get("modal_share"):
            numbers.append(Number(f"{m['model_id']}: share of samples naming the most frequent topic",
                                  m["modal_share"]["value"], _ci(m["modal_share"]),
                                  control="1 if the topic were fixed before writing", n=n))
        curve = [c for c in m["commitment"] if c.get("value") is not None]
        if curve:
            last = curve[-1]
            numbers.append(Number(f"{m['model_id']}: topic entropy after k = {last['k']} revealed tokens",
                                  last["value"], _ci(last), control=f"k = 0: {_fmt(te['value'])}",
                                  n=f"{last.get('n_rows', '')} phrasings", unit="nats"))
        probe = m["readout"].get("probe")
        if probe:
            best = max(probe, key=lambda row: row["accuracy"])
            shuffled = m["readout"]["shuffled"][probe.index(best)]
            numbers.append(Number(f"{m['model_id']}: topic probe accuracy before the first token (depth {best['depth']})",
                                  best["accuracy"], _ci(best), control=f"shuffled {_fmt(shuffled['accuracy'])}, "
                                  f"majority {_fmt(best['majority'])}", n=f"{m['readout']['n_prompts']} prompt groups"))
        else:
            numbers.append(Number(f"{m['model_id']}: topic probe before the first token", "not fitted",
                                  control=readout_skip_reason(m["readout"])))
        prefill = m["prefill"]
        if prefill.get("difference"):
            d = prefill["difference"]
            numbers.append(Number(f"{m['model_id']}: prefill other - own topic, entropy", d["mean"], _ci(d),
                                  control="; ".join(["0 if the topic was not cached", *[
                                      f"caveat: {note}" for note in small_sample_warnings(
                                          units=prefill["n_pairs"], unit_name="pairs")]]),
                                  n=f"{prefill['n_pairs']} pairs, other higher in {prefill['n_other_higher']}",
                                  unit="nats"))
        else:
            numbers.append(Number(f"{m['model_id']}: prefill other - own topic", "not run",
                                  control=_prefill_reason(prefill)))
    figures = [commitment_figure(data), readout_figure(data), prefill_figure(data)]
    return StageSection(
        "intention", "Cached intention: has the model chosen its topic before writing?",
        caption=("Topic entropy of sampled answers to open-ended prompts as k tokens of a reference answer are "
                 "revealed (k = 0: before the first output token), a topic probe on the last prompt token, and the "
                 "entropy after an own-topic vs other-topic prefill.<br>A model that has cached its choice starts "
                 "below the uniform line <i>with most samples naming a topic</i> (samples that name none, the 'other' "
                 "bucket, also give a low entropy), its probe beats its controls, and it is more uncertain after an "
                 "other-topic prefill; the verdict at the top combines the three."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path],
        sample=f"{data['n_prompts']} prompt groups, {data['n_phrasings']} phrasings",
    )


def _prefill_reason(prefill: Mapping) -> str:
    """Why the prefill test has no pair, in words."""
    parts = [f"{prefill.get('no_modal_topic', 0)} prompt(s) had no most-named topic to start from",
             f"{prefill.get('no_equal_length_alternative', 0)} had no other topic whose start has as many tokens"]
    return "no usable pair: " + "; ".join(parts)
