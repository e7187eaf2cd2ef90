"""Figures of the on/off-policy entropy gap (:mod:`surprise_probe.analyses.policy.gap`). Each returns a ``go.Figure``.

- :func:`gap_ratios`: the off/on ratio of mean entropy per reader, source and format, with CIs
  (1 = no gap; the paper's post-trained readers show 3-4x);
- :func:`reader_writer_heatmap`: mean entropy of each reader (rows) reading each writer (columns);
  the cell where a reader reads its own text (marked "on-policy") is the on-policy read;
- :func:`entropy_distributions`: per-response mean entropy per source (one box per source);
- :func:`entropy_by_position`: mean entropy at each response position per source, with CI bands;
- :func:`roc_curves`: telling own from off-policy responses by mean entropy alone;
- :func:`detector_aurocs`: the AUROC of own vs each source for every zero-shot detector (entropy,
  log-likelihood, log-rank, Fast-DetectGPT, Binoculars), one panel per detector, with CIs;
- :func:`temperature_curve`: the off/on ratio against own responses sampled at each temperature,
  one line per off-policy source with its CI band (only when temperatures were asked for).

:func:`describe_source` says what a source label (``own``, ``own_other_prompt``, ``human``,
``writer:<model>``) means; every figure names its sources that way. All use the white template of
the project's other figures.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sklearn.metrics import roc_curve

from surprise_probe.analyses.policy.statistics import DETECTORS
from surprise_probe.core.utils.plots import wrap_text

__all__ = ["gap_ratios", "reader_writer_heatmap", "entropy_distributions", "entropy_by_position", "roc_curves",
           "detector_aurocs", "temperature_curve", "all_figures", "describe_source", "SOURCE_DESCRIPTIONS"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
TEMPLATE = "plotly_white"

# What each source label means (the reading protocol is in docs/policy-gap.md).
SOURCE_DESCRIPTIONS = {
    "own": "the reader's own sampled answer to this prompt, read from its sampled ids: the on-policy read",
    "own_other_prompt": "the reader's own answer to another prompt, read after this prompt: its own style, "
                        "but not an answer to this prompt",
    "human": "the human-written answer to this prompt",
}


def describe_source(source: str) -> str:
    """A source label with what it means, e.g. ``own_other_prompt (the reader's own answer to another prompt, ...)``.

    >>> describe_source("writer:gemma-3-270m")
    "writer:gemma-3-270m (gemma-3-270m's answer to this prompt, re-tokenized by the reader)"
    """
    if source.startswith("writer:"):
        return f"{source} ({source.split(':', 1)[1]}'s answer to this prompt, re-tokenized by the reader)"
    return f"{source} ({SOURCE_DESCRIPTIONS[source]})" if source in SOURCE_DESCRIPTIONS else source


def _readers(result) -> list[str]:
    return [m["name"] for m in result.models]


def _formats(result) -> list[str]:
    seen = []
    for m in result.models:
        seen += [f for f in m["formats_read"] if f not in seen]
    return seen


def _sources(result) -> list[str]:
    order = {"own": 0, "own_other_prompt": 1, "human": 3}
    sources = {c["source"] for c in result.summary["cells"]}
    return sorted(sources, key=lambda s: (order.get(s, 2), s))


def _num(value) -> float:
    """A bound as a float: NaN where there is none (``None`` once read back from JSON)."""
    return float("nan") if value is None else float(value)


def _color(source: str, sources: list[str]) -> str:
    return _COLORS[sources.index(source) % len(_COLORS)]


def gap_ratios(result) -> go.Figure:
    """Off/on ratio with its CI per (reader, format), one marker colour per off-policy source."""
    fig = go.Figure()
    sources = _sources(result)
    k = result.config["k"]
    for source in [s for s in sources if s != "own"]:
        rows = [r for r in result.summary["comparisons"] if r["source"] == source and r["span"].get("n_prompts")]
        if not rows:
            continue
        labels = [f"{r['reader']} | {r['format']}" for r in rows]
        ratio = [r["span"]["ratio_off_on"] for r in rows]
        n = [r["span"]["n_prompts"] for r in rows]
        first = [r[f"first_{k}"].get("ratio_off_on", {}).get("value") for r in rows]
        fig.add_trace(go.Scatter(
            x=[q["value"] for q in ratio], y=labels, mode="markers", name=describe_source(source),
            marker={"color": _color(source, sources), "size": 10},
            error_x={"type": "data", "symmetric": False,
                     "array": [_num(q["high"]) - _num(q["value"]) for q in ratio],
                     "arrayminus": [_num(q["value"]) - _num(q["low"]) for q in ratio]},
            customdata=np.stack([n, first], 1),
            hovertemplate="%{y}<br>off/on %{x:.3f}<br>n=%{customdata[0]} prompts<br>"
                          f"first {k} tokens: " + "%{customdata[1]:.3f}<extra>" + source + "</extra>",
        ))
    fig.add_vline(x=1.0, line_dash="dash", line_color="grey")
    fig.update_layout(title="off-policy / on-policy mean output entropy (95% CI over prompts; 1 = no gap)",
                      xaxis_title="ratio of mean entropy, off / on", template=TEMPLATE,
                      height=300 + 30 * len(fig.data[0].y if fig.data else []),
                      legend={"orientation": "h", "yanchor": "top", "y": -0.25, "title": {"text": "off-policy source:"}})
    return fig


def reader_writer_heatmap(result) -> go.Figure:
    """Reader x writer mean entropy, one panel per format, on one colour scale; hover shows the CI.

    Rows read, columns wrote; the cell where a reader reads its own text is marked "on-policy"
    (the matrix is rarely square: ``human`` is a column, and one reader gives one row). The panels
    share their rows (labelled once, on the left) and one colour axis, so the one colour bar holds
    for every panel.
    """
    formats = _formats(result)
    fig = make_subplots(rows=1, cols=len(formats), subplot_titles=[f"format: {f}" for f in formats],
                        shared_yaxes=True, horizontal_spacing=0.03)
    values = []
    for col, fmt in enumerate(formats, start=1):
        table = result.summary["matrix"].get(fmt, {})
        readers = [r for r in _readers(result) if r in table]
        writers = [m["name"] for m in result.models] + (["human"] if any("human" in v for v in table.values()) else [])
        z, text = [], []
        for reader in readers:
            row_z, row_t = [], []
            for writer in writers:
                cell = table[reader].get(writer)
                row_z.append(None if cell is None else cell["mean"])
                row_t.append("" if cell is None else
                             ("<b>on-policy</b><br>" if writer == reader else "")
                             + f"{_num(cell['mean']):.2f}<br>[{_num(cell['low']):.2f}, {_num(cell['high']):.2f}]"
                             f"<br>n={cell['n_prompts']}")
            z.append(row_z)
            text.append(row_t)
        values += [v for row in z for v in row if v is not None and np.isfinite(v)]
        fig.add_trace(go.Heatmap(z=z, x=[f"writer: {w}" for w in writers], y=[f"reader: {r}" for r in readers],
                                 text=text, texttemplate="%{text}", coloraxis="coloraxis",
                                 hovertemplate="%{y}<br>%{x}<br>%{text}<extra>" + fmt + "</extra>"),
                      row=1, col=col)
    colour_axis = {"colorscale": "Viridis", "colorbar": {"title": {"text": "nats"}}}
    if values:
        colour_axis.update(cmin=min(values), cmax=max(values))
    fig.update_yaxes(automargin=True)
    fig.update_layout(title="mean output entropy over the response: rows read, columns wrote; the cell marked "
                            "on-policy is a reader reading its own text (one colour scale for every panel)",
                      coloraxis=colour_axis, height=220 + 90 * max(1, len(_readers(result))), template=TEMPLATE)
    return fig


def entropy_distributions(result) -> go.Figure:
    """Per-response mean entropy per source: one box per source, rows = format, columns = reader."""
    readers, formats, sources = _readers(result), _formats(result), _sources(result)
    fig = make_subplots(rows=len(formats), cols=len(readers), shared_yaxes=True,
                        subplot_titles=[f"{r} reads ({f})" for f in formats for r in readers])
    rows = result.to_dict()["per_response"]
    for i, fmt in enumerate(formats, start=1):
        for j, reader in enumerate(readers, start=1):
            for source in sources:
                values = [r["mean_entropy"] for r in rows if r["reader"] == reader and r["format"] == fmt
                          and r["source"] == source and r["mean_entropy"] is not None]
                if values:
                    fig.add_trace(go.Box(y=values, name=describe_source(source), marker_color=_color(source, sources),
                                         boxpoints="all", jitter=0.4, pointpos=0, showlegend=False),
                                  row=i, col=j)
    fig.update_yaxes(title_text="mean entropy per response (nats)", col=1)
    fig.update_layout(title="per-response mean output entropy by source", height=320 * len(formats) + 80,
                      template=TEMPLATE)
    return fig


def entropy_by_position(result) -> go.Figure:
    """Mean entropy at each response position (95% CI band over prompts), rows = format, columns = reader."""
    readers, formats, sources = _readers(result), _formats(result), _sources(result)
    fig = make_subplots(rows=len(formats), cols=len(readers), shared_yaxes=True,
                        subplot_titles=[f"{r} reads ({f})" for f in formats for r in readers])
    shown = set()
    for curve in result.summary["curves"]:
        if curve["reader"] not in readers or curve["format"] not in formats:
            continue
        i, j = formats.index(curve["format"]) + 1, readers.index(curve["reader"]) + 1
        n = np.asarray(curve["n_tokens"])
        keep = n > 0
        x = np.flatnonzero(keep)
        mean, low, high = (np.asarray(curve[key], np.float64)[keep] for key in ("mean", "low", "high"))
        color = _color(curve["source"], sources)
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([high, low[::-1]]),
                                 fill="toself", mode="lines", fillcolor=color, opacity=0.15, line={"width": 0},
                                 hoverinfo="skip", showlegend=False), row=i, col=j)
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=describe_source(curve["source"]), line={"color": color},
                                 legendgroup=curve["source"], showlegend=curve["source"] not in shown,
                                 customdata=n[keep], hovertemplate="position %{x}<br>%{y:.3f} nats<br>n=%{customdata}"),
                      row=i, col=j)
        shown.add(curve["source"])
    fig.update_xaxes(title_text="response token position")
    fig.update_yaxes(title_text="mean entropy (nats)", col=1)
    fig.update_layout(title="output entropy by position in the response", height=320 * len(formats) + 80,
                      template=TEMPLATE, legend={"orientation": "h", "yanchor": "top", "y": -0.12})
    return fig


def roc_curves(result) -> go.Figure:
    """ROC of telling own (positive) from each off-policy source by lower mean entropy."""
    readers, formats, sources = _readers(result), _formats(result), _sources(result)
    fig = make_subplots(rows=len(formats), cols=len(readers),
                        subplot_titles=[f"{r} ({f})" for f in formats for r in readers])
    rows = result.to_dict()["per_response"]
    shown = set()
    for i, fmt in enumerate(formats, start=1):
        for j, reader in enumerate(readers, start=1):
            def scores(source, reader=reader, fmt=fmt):
                return [-r["mean_entropy"] for r in rows if r["reader"] == reader and r["format"] == fmt
                        and r["source"] == source and r["mean_entropy"] is not None]

            own = scores("own")
            for row in result.summary["comparisons"]:
                if row["reader"] != reader or row["format"] != fmt:
                    continue
                off = scores(row["source"])
                if not own or not off:
                    continue
                fpr, tpr, _ = roc_curve([1] * len(own) + [0] * len(off), own + off)
                auc = row["auroc_entropy"]
                fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=describe_source(row["source"]),
                                         line={"color": _color(row["source"], sources)},
                                         legendgroup=row["source"], showlegend=row["source"] not in shown,
                                         hovertemplate=f"{row['source']}: AUROC {auc['auroc']:.2f} "
                                                       f"[{_num(auc['low']):.2f}, {_num(auc['high']):.2f}]"
                                                       "<extra></extra>"),
                              row=i, col=j)
                shown.add(row["source"])
            fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                                     showlegend=False, hoverinfo="skip"), row=i, col=j)
    fig.update_xaxes(title_text="false positive rate")
    fig.update_yaxes(title_text="true positive rate", col=1)
    fig.update_layout(title="own vs off-policy by mean entropy alone (hover: AUROC with DeLong 95% CI)",
                      height=320 * len(formats) + 80, template=TEMPLATE)
    return fig


_DETECTOR_TITLES = {"entropy": "mean entropy", "log_likelihood": "mean log-likelihood", "log_rank": "mean log-rank",
                    "fast_detectgpt": "Fast-DetectGPT", "binoculars": "Binoculars"}


def detector_title(name: str) -> str:
    """A detector's name for people (``fast_detectgpt`` -> ``Fast-DetectGPT``)."""
    return _DETECTOR_TITLES.get(name, name)


def detector_aurocs(result) -> go.Figure:
    """AUROC of own (positives) vs each off-policy source, one panel per detector, one row per
    reader | format | source, with the DeLong CI; 0.5 (dashed) is chance. A detector with no
    number (Binoculars without a second reader sharing the tokenizer) says why in its panel."""
    detectors = result.summary.get("detectors") or {name: {"key": f"auroc_{name}"} for name in DETECTORS}
    names = list(detectors)
    sources = _sources(result)
    rows = [r for r in result.summary["comparisons"] if r["span"].get("n_prompts")]
    labels = [f"{r['reader']} | {r['format']} | {r['source']}" for r in rows]
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[_DETECTOR_TITLES.get(n, n) for n in names])
    shown = set()
    for col, name in enumerate(names, start=1):
        key = detectors[name]["key"]
        missing = {r.get(key, {}).get("reason") for r in rows if r.get(key, {}).get("available") is False}
        for source in [s for s in sources if s != "own"]:
            mine = [(label, r[key]) for label, r in zip(labels, rows, strict=True)
                    if r["source"] == source and r.get(key, {}).get("available", True) and key in r]
            if not mine:
                continue
            values = [row for _, row in mine]
            fig.add_trace(go.Scatter(
                x=[_num(v["auroc"]) for v in values], y=[label for label, _ in mine], mode="markers",
                name=describe_source(source), legendgroup=source, showlegend=source not in shown,
                marker={"color": _color(source, sources), "size": 9},
                error_x={"type": "data", "symmetric": False,
                         "array": [_num(v["high"]) - _num(v["auroc"]) for v in values],
                         "arrayminus": [_num(v["auroc"]) - _num(v["low"]) for v in values]},
                customdata=np.array([[v.get("n_pos"), v.get("n_neg")] for v in values], dtype=object),
                hovertemplate="%{y}<br>AUROC %{x:.3f}<br>own n=%{customdata[0]}, other n=%{customdata[1]}"
                              f"<extra>{_DETECTOR_TITLES.get(name, name)}</extra>",
            ), row=1, col=col)
            shown.add(source)
        fig.add_vline(x=0.5, line_dash="dash", line_color="grey", row=1, col=col)
        if missing and not any(key in r and r[key].get("available", True) for r in rows):
            fig.add_annotation(text="not available:<br>" + "<br>".join(wrap_text(m, 40) for m in sorted(filter(None, missing))),
                               xref=f"x{col if col > 1 else ''} domain", yref="y domain", x=0.5, y=0.5,
                               showarrow=False, font={"size": 10, "color": "grey"})
    fig.update_xaxes(range=[-0.02, 1.02], title_text="AUROC")
    fig.update_yaxes(automargin=True)
    fig.update_layout(title="telling own (on-policy) text from each source: AUROC per detector, every score "
                            "oriented so higher = own (DeLong 95% CI; 0.5 = chance)",
                      template=TEMPLATE, height=320 + 24 * len(rows),
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "title": {"text": "off-policy source:"}})
    return fig


def temperature_curve(result) -> go.Figure:
    """Off/on mean-entropy ratio against the reader's own responses sampled at each temperature:
    one panel per reader (its sampling format), one line per off-policy source with its CI band."""
    curve = result.summary.get("temperature_curve") or []
    readers = [r for r in _readers(result) if any(row["reader"] == r for row in curve)] or _readers(result)
    sources = _sources(result)
    fig = make_subplots(rows=1, cols=len(readers), shared_yaxes=True,
                        subplot_titles=[f"{r} reads ({next((row['format'] for row in curve if row['reader'] == r), '')})"
                                        for r in readers])
    shown = set()
    for col, reader in enumerate(readers, start=1):
        for source in sorted({row["source"] for row in curve if row["reader"] == reader},
                             key=lambda s: sources.index(s) if s in sources else len(sources)):
            mine = sorted([row for row in curve if row["reader"] == reader and row["source"] == source],
                          key=lambda row: row["temperature"])
            x = np.array([row["temperature"] for row in mine])
            y = np.array([_num(row["ratio"]) for row in mine])
            low = np.array([_num(row["ci"][0]) for row in mine])
            high = np.array([_num(row["ci"][1]) for row in mine])
            color = _color(source, sources) if source in sources else _COLORS[-1]
            band = np.isfinite(low) & np.isfinite(high)
            if band.any():
                fig.add_trace(go.Scatter(x=np.concatenate([x[band], x[band][::-1]]),
                                         y=np.concatenate([high[band], low[band][::-1]]), fill="toself",
                                         mode="lines", fillcolor=color, opacity=0.15, line={"width": 0},
                                         hoverinfo="skip", showlegend=False, legendgroup=source), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=describe_source(source), line={"color": color},
                legendgroup=source, showlegend=source not in shown,
                customdata=np.stack([low, high, [row["n"] for row in mine]], 1),
                hovertemplate="T=%{x}<br>off/on %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                              "<br>n=%{customdata[2]} prompts<extra>" + source + "</extra>",
            ), row=1, col=col)
            shown.add(source)
        fig.add_hline(y=1.0, line_dash="dash", line_color="grey", row=1, col=col)
    fig.update_xaxes(title_text="sampling temperature of the reader's own responses")
    fig.update_yaxes(title_text="off / on mean entropy", col=1)
    fig.update_layout(title="off/on entropy ratio vs the temperature the reader's own responses were sampled at "
                            "(95% paired bootstrap CI over prompts; 1 = no gap)",
                      template=TEMPLATE, height=420,
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "title": {"text": "off-policy source:"}})
    return fig


CAPTIONS = {
    "gap_ratios": (
        "Off/on ratio of mean entropy",
        "Each marker: a reader's mean output entropy over the response when it reads another source, divided by "
        "its mean entropy on its own sampled responses (95% paired bootstrap CI over prompts). Right of the dashed "
        "line = the reader is more uncertain on others' text. Compare a post-trained reader with a base reader, "
        "and the formats (the plain format is the formatting control).",
    ),
    "reader_writer_heatmap": (
        "Reader x writer matrix",
        "Rows read, columns wrote; the cell marked on-policy is a reader reading its own text. A post-trained "
        "model's row should be darkest on its own column. Cells give the mean over prompts, its 95% CI and the "
        "number of prompts; one colour scale serves every panel.",
    ),
    "entropy_distributions": (
        "Per-response mean entropy by source",
        "One point per response. Overlap between the own box and the others is what limits the AUROC.",
    ),
    "entropy_by_position": (
        "Entropy by response position",
        "Mean entropy at each position of the response (bands: 95% CI over prompts; hover for the token count). "
        "Compare sources at the same position: entropy changes with position and responses differ in length.",
    ),
    "roc_curves": (
        "Telling own from off-policy text by entropy alone",
        "Positives: the reader's own responses; score: minus the mean entropy. The diagonal is chance; hover "
        "for the AUROC with its DeLong 95% CI.",
    ),
    "detector_aurocs": (
        "Zero-shot detectors of model-written text",
        "The same question as the ROC curves, asked of five detectors computed from the same reads: mean entropy "
        "(lower = own), mean log-likelihood of the response tokens (higher = own), mean log-rank (lower = own), "
        "Fast-DetectGPT's analytic criterion (higher = own) and Binoculars (lower = own; needs a second reader "
        "with the same tokenizer). Each marker: the AUROC of own vs that source with its DeLong 95% CI; right "
        "of 0.5 = the detector picks the reader's own text. Docs: docs/policy-gap.md.",
    ),
    "temperature_curve": (
        "Off/on ratio vs sampling temperature",
        "Each reader's own responses sampled again at each temperature; the off-policy texts stay the same. A "
        "ratio that falls towards 1 as the temperature rises says the gap comes from sampling the reader's modes "
        "(low temperature makes own text low-entropy by construction); one that stays above 1 at T = 1 is the "
        "on-policy gap proper. Bands: 95% paired bootstrap CI over prompts.",
    ),
}


def all_figures(result) -> dict[str, go.Figure]:
    return {
        "gap_ratios": gap_ratios(result),
        "reader_writer_heatmap": reader_writer_heatmap(result),
        "entropy_distributions": entropy_distributions(result),
        "entropy_by_position": entropy_by_position(result),
        "roc_curves": roc_curves(result),
        "detector_aurocs": detector_aurocs(result),
        **({"temperature_curve": temperature_curve(result)} if result.summary.get("temperature_curve") else {}),
    }
