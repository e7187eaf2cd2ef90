"""Figures of the cached-intention analysis. Each function takes an ``IntentionResult`` (or its
``to_dict()``) and returns a ``go.Figure``; write it with ``surprise_probe.core.utils.plots.write_html``.
All use the white template of the project's other figures. :func:`readout_skip_reason` says in
words why the pre-response topic probe was not fitted.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from surprise_probe.core.utils.plots import wrap_text

__all__ = ["topic_distribution_figure", "commitment_figure", "readout_figure", "prefill_figure",
           "readout_skip_reason"]

COLOURS = qualitative.Plotly
BUCKET_COLOURS = {"other": "#c8c8c8", "ambiguous": "#7f7f7f"}
TEMPLATE = "plotly_white"


def readout_skip_reason(readout: dict) -> str:
    """Why the pre-response topic probe was not fitted, in words (from the readout's counts).

    >>> readout_skip_reason({"classes": [], "n_prompts": 0, "n_folds": 0})
    'it learns topics that are the most-named topic of at least 2 prompt groups, and needs 2 such topics; here 0 topics qualified (0 prompt groups)'
    """
    classes, n_prompts = readout.get("classes") or [], readout.get("n_prompts") or 0
    if len(classes) < 2 or (readout.get("n_folds") or 0) < 2:
        return ("it learns topics that are the most-named topic of at least 2 prompt groups, and needs 2 such topics; "
                f"here {len(classes)} topic{'s' * (len(classes) != 1)} qualified ({n_prompts} prompt "
                f"group{'s' * (n_prompts != 1)})")
    return str(readout.get("skipped") or "no reason recorded")


def _as_dict(result) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def _band(fig, xs, low, high, colour, name, row=None, col=None):
    kwargs = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=list(xs) + list(xs)[::-1], y=list(high) + list(low)[::-1], fill="toself", mode="lines",
                             fillcolor=colour, opacity=0.2, line={"width": 0}, hoverinfo="skip",
                             showlegend=False, legendgroup=name), **kwargs)


def topic_distribution_figure(result) -> go.Figure:
    """Stacked share of each first-mentioned topic per prompt (phrasings pooled), one panel per model.

    Grey: the "other" (no topic named) and "ambiguous" buckets. Read: one tall bar = the model
    settles on one topic for that prompt; many thin bars = it spreads its choices.
    """
    data = _as_dict(result)
    models = data["models"]
    fig = make_subplots(rows=len(models), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{m['model_id']} ({m['prompt_format']} format)" for m in models])
    groups = list(dict.fromkeys(p["group"] for p in data["prompts"]))
    labels = list(dict.fromkeys(label for m in models for row in m["rows"] for label in row["counts"]))
    topics = [label for label in labels if label not in BUCKET_COLOURS] + [b for b in BUCKET_COLOURS if b in labels]
    colour = {t: BUCKET_COLOURS.get(t, COLOURS[i % len(COLOURS)]) for i, t in enumerate(topics)}
    for panel, m in enumerate(models, start=1):
        totals = {g: {} for g in groups}
        for row in m["rows"]:
            for label, count in row["counts"].items():
                totals[row["group"]][label] = totals[row["group"]].get(label, 0) + count
        for topic in topics:
            shares = [totals[g].get(topic, 0) / max(1, sum(totals[g].values())) for g in groups]
            if not any(shares):
                continue
            fig.add_trace(go.Bar(x=groups, y=shares, name=topic, marker_color=colour[topic], legendgroup=topic,
                                 showlegend=panel == 1,
                                 hovertemplate=f"{topic}<br>%{{x}}: %{{y:.0%}}<extra></extra>"),
                          row=panel, col=1)
        fig.update_yaxes(title_text="share of samples", range=[0, 1], row=panel, col=1)
    fig.update_layout(barmode="stack", height=320 * len(models) + 120, template=TEMPLATE,
                      title="First topic named per prompt (k = 0 samples, phrasings pooled)")
    return fig


def commitment_figure(result) -> go.Figure:
    """Topic entropy of the continuations vs k revealed tokens of a reference response, with CI bands.

    k = 0 is before the first output token. A model that has already chosen its topic starts low;
    one that chooses while writing starts near the dotted uniform reference and falls as tokens
    are revealed. Dots mark the median token at which the reference names its topic.
    """
    data = _as_dict(result)
    fig = go.Figure()
    for i, m in enumerate(data["models"]):
        colour = COLOURS[i % len(COLOURS)]
        points = [c for c in m["commitment"] if c.get("value") is not None]
        xs = [c["k"] for c in points]
        _band(fig, xs, [c["low"] for c in points], [c["high"] for c in points], colour, m["model_id"])
        fig.add_trace(go.Scatter(
            x=xs, y=[c["value"] for c in points], mode="lines+markers", name=m["model_id"], line={"color": colour},
            legendgroup=m["model_id"], customdata=[[c["n_rows"], c["n_samples"]] for c in points],
            hovertemplate="k=%{x}: %{y:.3f} nats<br>%{customdata[0]} phrasings, %{customdata[1]} samples<extra></extra>",
        ))
        fig.add_hline(y=m["uniform_reference"], line={"dash": "dot", "color": colour}, opacity=0.6,
                      annotation_text=f"uniform ({m['model_id']})", annotation_position="top right")
        mentions = sorted(row["reference"]["mention_token"] for row in m["rows"]
                          if row.get("reference") and row["reference"]["mention_token"] is not None)
        if mentions:
            fig.add_vline(x=mentions[len(mentions) // 2], line={"dash": "dash", "color": colour}, opacity=0.5,
                          annotation_text="median topic mention", annotation_position="bottom right")
    fig.update_layout(title="Commitment curve: topic entropy after k revealed tokens (95% CI)",
                      xaxis_title="k (tokens of the reference response revealed)",
                      yaxis_title="topic entropy (nats)", yaxis_rangemode="tozero", template=TEMPLATE)
    return fig


def readout_figure(result) -> go.Figure:
    """Pre-response decoding by depth, one panel per model.

    Probe: held-out accuracy (folds grouped by prompt, CI band) of a logistic probe for the modal
    topic from the residual at the last prompt token; beside it the shuffled-label control, the
    majority class, and the logit-lens readout of the topics' first tokens. The probe tells the
    topic only where it clears the shuffled control and the majority line.
    """
    data = _as_dict(result)
    models = data["models"]
    fig = make_subplots(rows=1, cols=len(models), shared_yaxes=True,
                        subplot_titles=[m["model_id"] for m in models])
    for col, m in enumerate(models, start=1):
        readout, first = m["readout"], col == 1
        lens = readout["logit_lens"]
        if lens["accuracy"]:
            fig.add_trace(go.Scatter(x=readout["depths"], y=lens["accuracy"], name="logit lens", mode="lines",
                                     line={"color": COLOURS[2]}, legendgroup="lens", showlegend=first),
                          row=1, col=col)
            fig.add_trace(go.Scatter(x=readout["depths"], y=lens["shuffled_accuracy"], name="logit lens, shuffled",
                                     mode="lines", line={"color": COLOURS[2], "dash": "dot"}, legendgroup="lens-s",
                                     showlegend=first), row=1, col=col)
            fig.add_trace(go.Scatter(x=readout["depths"], y=[lens["chance"]] * len(readout["depths"]),
                                     name="chance (1 / topics)", mode="lines", line={"color": "grey", "dash": "dash"},
                                     legendgroup="chance", showlegend=first), row=1, col=col)
        probe = readout.get("probe")
        if probe:
            depths = [p["depth"] for p in probe]
            _band(fig, depths, [p["low"] for p in probe], [p["high"] for p in probe], COLOURS[0], "probe", 1, col)
            fig.add_trace(go.Scatter(x=depths, y=[p["accuracy"] for p in probe], name="probe (grouped CV)",
                                     mode="lines+markers", line={"color": COLOURS[0]}, legendgroup="probe",
                                     showlegend=first), row=1, col=col)
            fig.add_trace(go.Scatter(x=depths, y=[s["accuracy"] for s in readout["shuffled"]],
                                     name="probe, shuffled labels", mode="lines", line={"color": COLOURS[1]},
                                     legendgroup="shuffled", showlegend=first), row=1, col=col)
            fig.add_trace(go.Scatter(x=depths, y=[p["majority"] for p in probe], name="majority class",
                                     mode="lines", line={"color": "black", "dash": "dash"}, legendgroup="majority",
                                     showlegend=first), row=1, col=col)
        else:
            fig.add_annotation(text=wrap_text(f"topic probe not fitted: {readout_skip_reason(readout)}", 60),
                               showarrow=False, align="left", xref=f"x{col if col > 1 else ''} domain",
                               yref="y domain", x=0.5, y=0.5, bgcolor="rgba(255,255,255,0.85)")
        fig.update_xaxes(title_text="depth (0 = embedding)", row=1, col=col)
    fig.update_yaxes(title_text="accuracy for the modal topic", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Decoding the eventual topic before the first output token", height=450,
                      width=max(700, 520 * len(models)), template=TEMPLATE)
    return fig


def prefill_figure(result) -> go.Figure:
    """Mean output entropy over the next tokens after a prefilled start naming the model's own
    modal topic vs another lexicon topic (equally many tokens), per model, with 95% CIs.

    A model that had cached its topic is more uncertain after being pushed onto another one
    (other above own); the paired difference and its sign count are in the hover.
    """
    data = _as_dict(result)
    fig = go.Figure()
    names = [m["model_id"] for m in data["models"]]
    for side, colour in (("own", COLOURS[0]), ("other", COLOURS[1])):
        ys, low, high, hover = [], [], [], []
        for m in data["models"]:
            p = m["prefill"]
            if not p.get(side):
                ys.append(None), low.append(0), high.append(0), hover.append(p.get("skipped", ""))
                continue
            ys.append(p[side]["mean"])
            low.append(p[side]["mean"] - p[side]["low"])
            high.append(p[side]["high"] - p[side]["mean"])
            d = p["difference"]
            hover.append(f"other - own {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]<br>"
                         f"{p['n_pairs']} pairs, other higher in {p['n_other_higher']}")
        fig.add_trace(go.Bar(x=names, y=ys, name=f"{side} topic prefilled", marker_color=colour,
                             error_y={"type": "data", "symmetric": False, "array": high, "arrayminus": low},
                             hovertext=hover, hovertemplate="%{y:.3f} nats<br>%{hovertext}<extra></extra>"))
    fig.update_layout(barmode="group", title="Prefill violation: entropy after an own-topic vs other-topic start",
                      yaxis_title="mean output entropy over the next tokens (nats)", template=TEMPLATE)
    return fig
