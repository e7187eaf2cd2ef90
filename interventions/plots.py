"""Plotly figures for intervention results; pure functions returning ``go.Figure``.

Write one with ``surprise_probe.core.utils.plots.write_html(fig, path)``: plotly.js is embedded so the file
opens offline.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["dose_response_figure", "ablation_figure", "patching_figure"]

# probe red, orthogonal control blue, every random direction one neutral grey (band, mean line and bars)
_PROBE, _ORTHO, _RANDOM, _RANDOM_LINE = "#d62728", "#1f77b4", "rgba(120,120,120,0.25)", "#7f7f7f"


def dose_response_figure(result) -> go.Figure:
    """Entropy, KL from clean and top-1 agreement vs steering strength: the probe (with its CI), the
    orthogonal control, and the band (min..max) and mean of the random directions."""
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    strengths = np.asarray(data["strengths"])
    labels = data["labels"]
    random_rows = [i for i, label in enumerate(labels) if label.startswith("random")]
    panels = [("entropy", "mean output entropy (nats)"), ("kl", "mean KL(steered || clean) (nats)"),
              ("top1_agreement", "top-1 agreement with clean")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in panels], horizontal_spacing=0.07)
    for col, (key, _) in enumerate(panels, start=1):
        values = np.asarray(data[key])
        first = col == 1
        if random_rows:
            band = values[random_rows]
            fig.add_trace(go.Scatter(
                x=np.concatenate([strengths, strengths[::-1]]),
                y=np.concatenate([band.max(0), band.min(0)[::-1]]),
                fill="toself", mode="lines", fillcolor=_RANDOM, line={"width": 0}, hoverinfo="skip",
                name=f"random directions (k={len(random_rows)}, min..max)", legendgroup="random",
                showlegend=first,
            ), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=strengths, y=band.mean(0), mode="lines", line={"color": _RANDOM_LINE, "dash": "dot"},
                name="random mean", legendgroup="randmean", showlegend=first,
            ), row=1, col=col)
        if "orthogonal" in labels:
            fig.add_trace(go.Scatter(
                x=strengths, y=values[labels.index("orthogonal")], mode="lines+markers",
                line={"color": _ORTHO}, name="orthogonal to probe", legendgroup="ortho", showlegend=first,
            ), row=1, col=col)
        error = None
        if key == "entropy":
            ci = np.asarray(data["probe_entropy_ci"])
            error = {"type": "data", "symmetric": False, "array": ci[:, 1] - values[0],
                     "arrayminus": values[0] - ci[:, 0]}
        fig.add_trace(go.Scatter(
            x=strengths, y=values[0], mode="lines+markers", line={"color": _PROBE, "width": 3},
            error_y=error, name="probe direction", legendgroup="probe", showlegend=first,
            hovertemplate="strength=%{x}<br>%{y:.4f}<extra>probe</extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="steering strength (std of the probe projection)", row=1, col=col)
    low, high = data["probe_slope_ci"]
    # no fixed width: the figure fills its page (1300 px or less), the title wraps onto a second line
    fig.update_layout(
        title=(f"Steering at {data['hook']} ({data['positions']} positions)<br><sup>entropy slope "
               f"{data['probe_slope']:.4g} nats/std [{low:.4g}, {high:.4g}], z = {_z(data['z_score'])} "
               f"vs random; {data['n_sequences']} sequences, {data['n_tokens']} scored tokens</sup>"),
        template="plotly_white", height=470, margin={"t": 100, "l": 60, "r": 30},
        legend={"orientation": "h", "y": -0.22},
    )
    return fig


def _z(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def ablation_figure(result) -> go.Figure:
    """Entropy change when each direction is projected out; the probe bar carries its CI."""
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    labels, change = data["labels"], np.asarray(data["entropy_change"])
    colors = [_PROBE if lab == "probe" else _ORTHO if lab == "orthogonal" else _RANDOM_LINE for lab in labels]
    low, high = data["probe_change_ci"]
    errors = np.zeros((2, len(labels)))
    errors[:, 0] = [high - change[0], change[0] - low]
    fig = go.Figure(go.Bar(
        x=labels, y=change, marker_color=colors,
        error_y={"type": "data", "symmetric": False, "array": errors[0], "arrayminus": errors[1]},
        customdata=np.stack([data["kl"], data["top1_agreement"]], -1),
        hovertemplate="%{x}<br>entropy change %{y:.4g} nats<br>KL %{customdata[0]:.4g}"
                      "<br>top-1 agreement %{customdata[1]:.3f}<extra></extra>",
    ))
    fig.update_layout(
        title=(f"Projecting the direction out at {data['hook']} ({data['positions']} positions): "
               f"z = {_z(data['z_score'])} vs random"),
        yaxis_title="mean entropy change (ablated - clean, nats)", template="plotly_white",
    )
    return fig


def patching_figure(result) -> go.Figure:
    """Layer x position-group heatmap of the fraction of the entropy gap closed, per component."""
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    components = list(data["components"])
    names = {"direction": "component along d", "all": "whole activation"}
    grids = {c: (data["fraction"][c], data["fraction_ci"][c]) for c in components}
    if data.get("random_directions"):  # the random-direction control: mean over k, CI = [min, max]
        name = f"{data['random_directions']} random directions (mean; min..max)"
        names[name] = name
        components.append(name)
        grids[name] = ([[None if v is None else float(np.mean(v)) for v in row] for row in data["random_fraction"]],
                       [[None if v is None else (min(v), max(v)) for v in row] for row in data["random_fraction"]])
    # one shared layer axis (labels once, on the left) so panels never overlap their neighbours' labels
    fig = make_subplots(rows=1, cols=len(components), subplot_titles=[names[c] for c in components],
                        shared_yaxes=True, horizontal_spacing=0.03)
    layers = [_layer_label(hook) for hook in data["hooks"]]
    for col, component in enumerate(components, start=1):
        values, bounds = grids[component]
        # a group with no positions is n/a (None): a blank cell labelled n/a, never a 0
        z = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        ci = np.array([[(np.nan, np.nan) if b is None else b for b in row] for row in bounds], dtype=float)
        # the CI is printed in the cell, not only on hover
        text = [["n/a" if v is None else f"{v:.2f}" + ("" if b is None else f"<br>[{b[0]:.2f}, {b[1]:.2f}]")
                 for v, b in zip(row, brow, strict=True)] for row, brow in zip(values, bounds, strict=True)]
        fig.add_trace(go.Heatmap(
            z=z, x=data["groups"], y=layers, zmid=0, colorscale="RdBu_r", zmin=-1, zmax=1,
            customdata=ci, text=text, texttemplate="%{text}", textfont={"size": 11},
            hovertemplate="%{y}<br>%{x}<br>fraction closed %{text}<extra></extra>",
            colorbar={"title": "fraction", "len": 0.9}, showscale=col == len(components),
        ), row=1, col=col)
        fig.update_xaxes(title_text="patched positions", row=1, col=col)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(
        title=(f"Fraction of the entropy gap closed by patching source -> destination<br><sup>source "
               f"{data['entropy_source']:.3f}, destination {data['entropy_destination']:.3f} nats; {data['n_pairs']} "
               f"pairs; cells: fraction [{round(100 * data.get('level', 0.95))}% CI]</sup>"),
        template="plotly_white", height=max(380, 46 * len(data["hooks"]) + 220), margin={"t": 110},
    )
    return fig


def _layer_label(hook: str) -> str:
    """``blocks.12.hook_resid_post`` -> ``L12 resid_post`` (short enough to never overlap)."""
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return f"L{parts[1]} {parts[2].removeprefix('hook_')}"
    return hook
