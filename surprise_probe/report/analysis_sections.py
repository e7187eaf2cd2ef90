"""Report sections for the analyses: the token view, the policy gap and cached intention.

:func:`token_view_section` reads ``token_view.json``, :func:`gap_section` ``gap.json`` and
:func:`intention_section` ``intention.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from surprise_probe.analyses.intention.plots import (
    commitment_figure,
    prefill_figure,
    readout_figure,
)
from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.analyses.token_view import token_view_html
from surprise_probe.core.utils.jsonio import read_json
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


def gap_section(folder: str | Path) -> StageSection:
    """From ``gap.json``: each reader's off/on-policy entropy ratio, beside the base reader's."""

    path = Path(folder) / "gap.json"
    data = read_json(path)
    k = data["config"]["k"]
    kinds = {m["name"]: ("post-trained" if m["post_trained"] else "base" if m["post_trained"] is False else "")
             for m in data["models"]}
    rows = [r for r in data["summary"]["comparisons"] if r["span"].get("n_prompts")]
    numbers = []
    for m in data["models"]:
        fmt = "assistant" if "assistant" in m["formats_read"] else m["formats_read"][0]
        for row in [r for r in rows if r["reader"] == m["name"] and r["format"] == fmt]:
            ratio, auroc = row["span"]["ratio_off_on"], row.get("auroc_entropy") or {}
            others = [r for r in rows if r["reader"] != m["name"] and r["source"] == row["source"]]
            controls = [f"{r['reader']} ({kinds.get(r['reader'], '')}, {r['format']}): "
                        f"{_fmt(r['span']['ratio_off_on']['value'])}" for r in others[:1]]
            plain = [r for r in rows if r["reader"] == m["name"] and r["source"] == row["source"]
                     and r["format"] == "plain" and fmt != "plain"]
            controls += [f"plain format: {_fmt(r['span']['ratio_off_on']['value'])}" for r in plain]
            controls.append(f"AUROC {_fmt(auroc.get('auroc'))} [{_fmt(auroc.get('low'))}, {_fmt(auroc.get('high'))}]")
            numbers.append(Number(
                f"{m['name']} ({kinds[m['name']] or 'kind unknown'}, {fmt} format) reading {row['source']}: "
                "off/on mean entropy", ratio["value"], _ci(ratio), control="; ".join(controls),
                n=f"{row['span']['n_prompts']} prompts"))
    n = f"{data['n_prompts']} prompts, {data['config']['n_samples']} sample(s) each, readers " + ", ".join(
        f"{m['name']} ({kinds[m['name']] or '?'})" for m in data["models"])
    saved = _SavedGap(data)
    figures = [policy_plots.gap_ratios(saved), policy_plots.reader_writer_heatmap(saved),
               policy_plots.entropy_by_position(saved)]
    return StageSection(
        "gap", "Policy gap: on-policy vs off-policy entropy",
        caption=("Each reader's mean output entropy on others' text divided by its entropy on its own sampled "
                 f"answers (95% paired bootstrap CI over prompts; first {k} tokens and AUROC in the JSON).<br>"
                 "1 = no gap; the claim is a ratio well above 1 for a post-trained reader and near 1 for a base "
                 "reader; the plain format is the formatting control."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path], sample=n,
    )


def intention_section(folder: str | Path) -> StageSection:
    """From ``intention.json``: topic entropy before the first token, commitment, readout, prefill."""

    path = Path(folder) / "intention.json"
    data = read_json(path)
    numbers = []
    for m in data["models"]:
        te = m["topic_entropy"]
        n = f"{te['n_prompts']} prompts, {te['n_rows']} phrasings x {te['n_samples']} samples"
        numbers.append(Number(f"{m['model_id']}: topic entropy at k = 0", te["value"], _ci(te),
                              control=f"uniform over the lexicon, same n: {_fmt(m['uniform_reference'])}", n=n,
                              unit="nats"))
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
                                  f"majority {_fmt(best['majority'])}", n=f"{m['readout']['n_rows']} phrasings"))
        else:
            numbers.append(Number(f"{m['model_id']}: topic probe", "not fitted",
                                  control=str(m["readout"].get("skipped", ""))))
        prefill = m["prefill"]
        if prefill.get("difference"):
            d = prefill["difference"]
            numbers.append(Number(f"{m['model_id']}: prefill other - own topic, entropy", d["mean"], _ci(d),
                                  control="0 if the topic was not cached",
                                  n=f"{prefill['n_pairs']} pairs, other higher in {prefill['n_other_higher']}",
                                  unit="nats"))
    figures = [commitment_figure(data), readout_figure(data), prefill_figure(data)]
    return StageSection(
        "intention", "Cached intention: has the model chosen its topic before writing?",
        caption=("Topic entropy of sampled answers to open-ended prompts as k tokens of a reference answer are "
                 "revealed (k = 0: before the first output token), a topic probe on the last prompt token, and the "
                 "entropy after an own-topic vs other-topic prefill.<br>A model that has cached its choice starts "
                 "below the uniform line and is more uncertain after an other-topic prefill."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path],
        sample=f"{data['n_prompts']} prompts, {data['n_phrasings']} phrasings",
    )
