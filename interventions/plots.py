"""Plotly figures for intervention results; pure functions returning ``go.Figure``.

Write one with ``surprise_probe.core.utils.plots.write_html(fig, path)``: plotly.js is embedded so the file
opens offline.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["dose_response_figure", "ablation_figure", "patching_figure", "norm_control_figure"]

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


_MODE_NAMES = {"total": "total (nothing frozen)", "final_norm_frozen": "final norm frozen",
               "later_norms_frozen": "all later norms frozen"}
_ENTROPY_PROBE = "#ff7f0e"


def _error_bar(value: float, low: float, high: float) -> dict:
    return {"type": "data", "symmetric": False, "array": [high - value], "arrayminus": [value - low]}


def norm_control_figure(result) -> go.Figure:
    """"Surprise or the norm?" in four panels: the entropy slope with norms free or frozen (probe
    bar with its CI, random directions as grey points); the slope remaining with the entropy
    neurons mean-ablated (vs random neuron sets); null-space share against cosine with the mean
    residual (probe, entropy probe, random directions; dotted: what random expects); and every
    neuron of the entropy-neuron layer(s), output-weight norm against null-space share."""
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.17, horizontal_spacing=0.1, subplot_titles=(
        "entropy slope (nats per std of steering)", "slope remaining with entropy neurons mean-ablated",
        "direction geometry", "neurons of the entropy-neuron layer(s)"))
    for k, mode in enumerate(_MODE_NAMES):
        effect = data["effects"][mode]
        value, (low, high) = effect["probe_slope"], effect["probe_slope_ci"]
        share = data["direct_share"].get(mode)
        note = "" if share is None else f"<br>share of total {share['value']:.3f}"
        fig.add_trace(go.Bar(
            x=[_MODE_NAMES[mode]], y=[value], marker_color=_PROBE, error_y=_error_bar(value, low, high),
            name="probe direction", legendgroup="probe", showlegend=k == 0,
            hovertemplate=f"%{{x}}<br>slope %{{y:.4g}} [{low:.4g}, {high:.4g}]<br>z = {_z(effect['z_score'])}"
                          f"{note}<extra>probe</extra>",
        ), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=[_MODE_NAMES[mode]] * len(effect["random_slopes"]), y=effect["random_slopes"], mode="markers",
            marker={"color": _RANDOM_LINE, "size": 7, "opacity": 0.7}, name="random directions",
            legendgroup="random", showlegend=k == 0, hovertemplate="random: %{y:.4g}<extra></extra>",
        ), row=1, col=1)
    mediation = data.get("mediation")
    if mediation:
        value, low, high = mediation["remaining"], mediation["remaining_low"], mediation["remaining_high"]
        fig.add_trace(go.Bar(
            x=[f"{len(data['entropy_neurons'])} entropy neurons"], y=[value], marker_color=_PROBE,
            error_y=_error_bar(value, low, high), showlegend=False,
            hovertemplate="remaining %{y:.3f}" + f" [{low:.3f}, {high:.3f}]<extra></extra>",
        ), row=1, col=2)
        fig.add_trace(go.Scatter(
            x=["random neuron sets"] * len(mediation["random_remaining"]), y=mediation["random_remaining"],
            mode="markers", marker={"color": _RANDOM_LINE, "size": 7}, showlegend=False,
            hovertemplate="random set: %{y:.3f}<extra></extra>",
        ), row=1, col=2)
        fig.add_hline(y=1.0, line={"dash": "dot", "color": _RANDOM_LINE}, row=1, col=2)
    else:
        fig.add_annotation(text="not run (see warnings)", showarrow=False, xref="x2 domain", yref="y2 domain",
                           x=0.5, y=0.5)
    geometry = data["geometry"]
    random = geometry["random"]
    fig.add_trace(go.Scatter(
        x=random["null_share"], y=random["cos_mean_residual"], mode="markers",
        marker={"color": _RANDOM_LINE, "size": 7}, name="random directions", legendgroup="random", showlegend=False,
        hovertemplate="share %{x:.4f}<br>cos %{y:.3f}<extra>random</extra>",
    ), row=2, col=1)
    points = [("probe direction", geometry["probe"], _PROBE, "probe")]  # red: the probe's legend entry above
    if geometry.get("entropy_probe"):
        points.append((f"entropy probe ({geometry['entropy_probe']['hook']})", geometry["entropy_probe"],
                       _ENTROPY_PROBE, "entropy"))
    for name, point, color, group in points:
        fig.add_trace(go.Scatter(
            x=[point["null_share"]], y=[point["cos_mean_residual"]], mode="markers",
            marker={"color": color, "size": 12, "symbol": "diamond"}, name=name, legendgroup=group,
            showlegend=group != "probe",
            hovertemplate="share %{x:.4f}<br>cos %{y:.3f}<extra>" + name + "</extra>",
        ), row=2, col=1)
    expected = geometry["null_space"]["expected_random_share"]
    fig.add_vline(x=expected, line={"dash": "dot", "color": _RANDOM_LINE}, row=2, col=1)
    chosen = {(n["layer"], n["index"]) for n in data["entropy_neurons"]}
    for layer, values in data.get("neuron_scatter", {}).items():
        picked = [i for i in range(len(values["norm"])) if (int(layer), i) in chosen]
        rest = [i for i in range(len(values["norm"])) if (int(layer), i) not in chosen]
        for indices, color, size, name in ((rest, _RANDOM_LINE, 4, f"layer {layer} neurons"),
                                           (picked, _PROBE, 9, f"layer {layer} entropy neurons")):
            fig.add_trace(go.Scatter(
                x=[values["norm"][i] for i in indices], y=[values["share"][i] for i in indices], mode="markers",
                marker={"color": color, "size": size}, name=name, customdata=indices,
                hovertemplate="neuron %{customdata}<br>norm %{x:.3f}<br>share %{y:.3f}<extra>" + f"L{layer}</extra>",
            ), row=2, col=2)
    fig.update_yaxes(title_text="nats per std", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the total slope", row=1, col=2)
    fig.update_xaxes(title_text=f"share of squared norm in W_U's {geometry['null_space']['k']} least-read directions",
                     row=2, col=1)
    fig.update_yaxes(title_text="cosine with the mean residual", row=2, col=1)
    fig.update_xaxes(title_text="||W_out[i]||", row=2, col=2)
    fig.update_yaxes(title_text="null-space share of W_out[i]", row=2, col=2)
    total = data["effects"]["total"]
    fig.update_layout(
        title=(f"Surprise or the norm? Steering at {data['hook']} ({data['normalization_type']})<br><sup>total slope "
               f"{total['probe_slope']:.4g} nats/std, z = {_z(total['z_score'])}; {data['n_sequences']} sequences, "
               f"{data['n_tokens']} scored tokens; bars: {round(100 * data['level'])}% CI</sup>"),
        template="plotly_white", height=820, margin={"t": 110, "l": 60, "r": 30}, barmode="overlay",
        legend={"orientation": "h", "y": -0.12},
    )
    return fig
