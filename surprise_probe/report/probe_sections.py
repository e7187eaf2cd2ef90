"""Report sections for what the model reads and encodes: the capture and the probe sweeps.

:func:`capture_section` reads ``capture_summary.json``; :func:`fit_section` reads ``sweep.json``
and draws it with :func:`fit_figure` (held-out R^2 per layer beside its token-identity and
shuffled-label controls).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from surprise_probe.core.utils.jsonio import read_json
from surprise_probe.core.utils.stats import permutation_p_text
from surprise_probe.probes.plots import SHUFFLE_COLOUR, TOKEN_IDENTITY_COLOUR
from surprise_probe.probes.results import hook_layer
from surprise_probe.report.values import Number, StageSection, _ci, _fmt, _value

__all__ = ["capture_section", "fit_section", "fit_figure"]


def capture_section(folder: str | Path) -> StageSection:
    """From ``capture_summary.json``: mean surprise and entropy over the scored span, with CIs."""
    path = Path(folder) / "capture_summary.json"
    data = read_json(path)
    n = f"{data['n_sequences']} sequences, {data['n_scored_tokens']} scored tokens"
    numbers = []
    for key, label in (("input_surprise", "mean input surprise"), ("output_entropy", "mean output entropy")):
        estimate = data[key]
        numbers.append(Number(label, estimate["mean"], (estimate["low"], estimate["high"]),
                              control="", n=n, unit="nats"))
    layers = data.get("layers") or []
    fig = go.Figure()
    if layers:
        x, ticks = _layer_axis([row["hook"] for row in layers])
        hover = "%{text}<br>r %{y:.3f}<extra></extra>"
        fig.add_trace(go.Scatter(x=x, y=[row["corr_norm_surprise"] for row in layers], mode="lines+markers",
                                 name="r(|resid|, input surprise)", line={"color": "#d62728"},
                                 text=[row["hook"] for row in layers], hovertemplate=hover))
        fig.add_trace(go.Scatter(x=x, y=[row["corr_norm_entropy"] for row in layers], mode="lines+markers",
                                 name="r(|resid|, output entropy)", line={"color": "#1f77b4", "dash": "dash"},
                                 text=[row["hook"] for row in layers], hovertemplate=hover))
        fig.add_hline(y=0, line={"color": "#999", "width": 1})
        fig.update_xaxes(**ticks)
    fig.update_layout(title="First look: correlation of the residual norm with surprise and entropy, per hook",
                      yaxis_title="Pearson r over scored tokens", template="plotly_white",
                      height=380, legend={"orientation": "h", "y": -0.28})
    return StageSection(
        "capture", "Capture: per-token surprise, entropy and activations",
        caption=("What the model read: means over the scored span with sequence-bootstrap CIs, and how the "
                 "residual norm at each hook correlates with surprise and entropy.<br>A norm correlation is only a "
                 "first look; the probes below test linear decodability with controls."),
        figures=[fig] if layers else [], numbers=numbers, json_paths=[path], sample=n,
    )


def _layer_axis(hooks: Sequence[str]) -> tuple[list[float], dict]:
    """x positions and tick labels by layer index (``blocks.L.hook_resid_post`` -> L; the
    embedding ``blocks.0.hook_resid_pre`` -> "embed" left of layer 0); hover shows the hook name."""

    x = []
    for hook in hooks:
        layer = hook_layer(hook)
        x.append(-1.0 if hook.endswith("hook_resid_pre") and layer == 0 else
                 float(layer) - (0.5 if hook.endswith("hook_resid_pre") else 0.0) if layer is not None else float("nan"))
    ticks = sorted({v for v in x if np.isfinite(v)})
    step = max(1, len(ticks) // 16)
    shown = ticks[::step]
    return x, {"tickmode": "array", "tickvals": shown, "ticktext": ["embed" if v == -1 else f"{v:g}" for v in shown],
               "title_text": "layer L = hook blocks.L.hook_resid_post (hover shows the hook)"}


def fit_figure(data: Mapping) -> go.Figure:
    """Held-out R^2 per hook (95% CI band) beside its controls, from a saved ``sweep.json``.

    Red: the probe; dashed red: the probe on the target minus its token-type mean (what the
    activations add beyond the token's identity); grey dashed with a grey band: shuffled labels;
    purple long-dashed line: the token-type mean baseline; purple diamond: the embedding-layer probe
    (both token identity; the colours are those of ``probes.plots.layer_sweep_figure``).
    """
    hooks = [row for row in data["hooks"] if row.get("hook") != "blocks.0.hook_resid_pre"]
    names = [row["hook"] for row in hooks]
    x, ticks = _layer_axis(names)
    r2 = [row["r2"] for row in hooks]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x + x[::-1], y=[e["high"] for e in r2] + [e["low"] for e in r2][::-1],
                             fill="toself", mode="lines", fillcolor="rgba(214,39,40,0.18)", line={"width": 0}, hoverinfo="skip",
                             name="probe 95% CI"))
    fig.add_trace(go.Scatter(x=x, y=[e["value"] for e in r2], mode="lines+markers", name="probe (held-out R²)",
                             line={"color": "#d62728", "width": 3}, text=names,
                             customdata=[[e["low"], e["high"]] for e in r2],
                             hovertemplate="%{text}<br>R² %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"))
    residual = [row.get("residual_r2") for row in hooks]
    if residual and all(isinstance(e, Mapping) for e in residual):
        fig.add_trace(go.Scatter(x=x, y=[e["value"] for e in residual], mode="lines", name="beyond token-type mean",
                                 line={"color": "#d62728", "dash": "dash"}, text=names,
                                 hovertemplate="%{text}<br>R² beyond token mean %{y:.3f}<extra></extra>"))
    shuffled = [(xi, row["shuffle_r2"]) for xi, row in zip(x, hooks, strict=True) if row.get("shuffle_r2")]
    if shuffled:
        sx = [xi for xi, _ in shuffled]
        fig.add_trace(go.Scatter(x=sx + sx[::-1], y=[max(v) for _, v in shuffled] + [min(v) for _, v in shuffled][::-1],
                                 fill="toself", mode="lines", fillcolor="rgba(140,140,140,0.22)", line={"width": 0},
                                 hoverinfo="skip", name="shuffled labels (min..max)", legendgroup="shuffle"))
        fig.add_trace(go.Scatter(x=sx, y=[float(np.mean(v)) for _, v in shuffled], mode="lines",
                                 name="shuffled labels (mean)", legendgroup="shuffle",
                                 line={"color": SHUFFLE_COLOUR, "dash": "dash", "width": 2}))
    controls = data.get("controls") or {}
    token_mean = controls.get("token_mean_r2")
    if _value(token_mean) is not None and x:
        span = [-1, max(x)]
        ci = _ci(token_mean)
        if ci is not None and None not in ci:
            fig.add_trace(go.Scatter(x=span + span[::-1], y=[ci[1], ci[1], ci[0], ci[0]], fill="toself", mode="lines",
                                     fillcolor="rgba(94,43,151,0.14)", line={"width": 0}, hoverinfo="skip",
                                     showlegend=False, legendgroup="token"))
        fig.add_trace(go.Scatter(x=span, y=[_value(token_mean)] * 2, mode="lines", legendgroup="token",
                                 name="token-type mean (token identity)",
                                 line={"color": TOKEN_IDENTITY_COLOUR, "dash": "longdash", "width": 2}))
    for key, name, colour, dash in (("bigram_r2", "bigram mean (previous + current token)", "#8c564b", "dot"),
                                    ("position_r2", "position in the sequence", "#17becf", "dashdot")):
        baseline = _value(controls.get(key))
        if baseline is not None and x:
            fig.add_trace(go.Scatter(x=[-1, max(x)], y=[baseline] * 2, mode="lines", name=f"{name} baseline",
                                     line={"color": colour, "dash": dash, "width": 2},
                                     hovertemplate=f"{name}: R² {baseline:.3f}<extra></extra>"))
    embedding = _value(controls.get("embedding_r2"))
    if embedding is not None and x:
        fig.add_trace(go.Scatter(x=[-1], y=[embedding], mode="markers", name="embedding-layer probe",
                                 marker={"symbol": "diamond-open", "size": 13, "color": TOKEN_IDENTITY_COLOUR,
                                         "line": {"width": 2}}))
        ticks["tickvals"] = [-1, *[v for v in ticks["tickvals"] if v != -1]]
        ticks["ticktext"] = ["embed" if v == -1 else f"{v:g}" for v in ticks["tickvals"]]
    fig.update_xaxes(**ticks)
    fig.update_layout(title=f"Decoding {data.get('target', 'the target')} from each layer ({data.get('n_tokens')} "
                            f"tokens, {data.get('n_sequences')} sequences)",
                      yaxis_title="held-out R²", template="plotly_white", height=420,
                      legend={"orientation": "h", "y": -0.28})
    return fig


def fit_section(folder: str | Path, target: str | None = None) -> StageSection:
    """From ``sweep.json``: held-out R^2 by layer; the best layer beside every control the sweep ran
    (token-type mean, embedding-layer probe, bigram, position, shuffled labels)."""
    path = Path(folder) / "sweep.json"
    data = read_json(path)
    target = target or data.get("target", "target")
    n = f"{data['n_sequences']} sequences, {data['n_tokens']} tokens"
    best = next((row for row in data["hooks"] if row["hook"] == data.get("best_hook")), None)
    controls = data.get("controls") or {}
    baselines = [f"{label} {_fmt(_value(controls[key]))}" for key, label in _CONTROLS if controls.get(key) is not None]
    numbers = []
    if best is not None:
        shuffle = best.get("shuffle_r2") or []
        shuffled = (f"shuffled labels max {_fmt(best.get('shuffle_r2_max', max(shuffle)))} "
                    f"(p {_p_text(best.get('shuffle_p'), len(shuffle))})" if shuffle else "shuffled labels n/a")
        numbers.append(Number(f"held-out R² at {best['hook']} (best layer)", best["r2"]["value"], _ci(best["r2"]),
                              control="; ".join([*baselines, shuffled]), n=n))
        if isinstance(best.get("residual_r2"), Mapping):
            numbers.append(Number("R² of the target minus its token-type mean (same layer)", best["residual_r2"]["value"],
                                  _ci(best["residual_r2"]), control="0 if only token identity is decoded", n=n))
        for key, label in (("bigram", "bigram mean"), ("position", "position baseline")):
            beyond = (best.get("beyond_r2") or {}).get(key)
            if isinstance(beyond, Mapping):
                numbers.append(Number(f"R² of the target minus its {label} (same layer)", beyond["value"], _ci(beyond),
                                      control=f"0 if only the {label} is decoded", n=n))
    for key, label in _CONTROLS:
        if controls.get(key) is not None:
            numbers.append(Number(f"control: {label} R²", _value(controls[key]), _ci(controls[key]), n=n))
    title = {"surprise": "Probes: decoding input surprise", "entropy": "Probes: decoding output entropy"}.get(
        target, f"Probes: decoding {target}")
    return StageSection(
        f"fit_{target}", title,
        caption=("Held-out R² of a ridge probe at every layer (sequence-grouped CV; band: 95% bootstrap CI over "
                 "sequences), beside its baselines: token-type mean, embedding-layer probe, bigram mean (previous + "
                 "current token), position, shuffled labels.<br>Read the gap between the red curve and the highest "
                 "baseline: that is what the residual stream encodes beyond them; the grey shuffled-label band should "
                 "sit near 0."),
        figures=[fit_figure(data)], numbers=numbers, json_paths=[path], sample=n,
    )


_CONTROLS = (("token_mean_r2", "token-type mean"), ("embedding_r2", "embedding-layer probe"),
             ("bigram_r2", "bigram mean"), ("position_r2", "position"))


def _p_text(p, n_shuffles: int) -> str:
    text = "n/a" if p is None else permutation_p_text(float(p), n_shuffles)
    return text if text.startswith("<=") else f"= {text}"
