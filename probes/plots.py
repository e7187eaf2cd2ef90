"""Figures of probe results; each function returns a ``plotly.graph_objects.Figure``.

Write one with ``surprise_probe.core.utils.plots.write_html(fig, path)`` to get a file that opens offline.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from surprise_probe.probes.results import EMBEDDING_HOOK, SweepResult, layer_label

from surprise_probe.core.forward.hooks import hook_kind

__all__ = ["layer_sweep_figure", "alpha_curve_figure", "source_figure"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
# the two controls every sweep shows, in colours no other trace uses: token identity (the
# token-type mean line and the embedding probe) purple long-dashed, shuffled labels grey dashed
TOKEN_IDENTITY_COLOUR, SHUFFLE_COLOUR = "#5e2b97", "#8c8c8c"
# one colour per control: its baseline is a horizontal line, the probe on its residual a dotted curve
_CONTROL_STYLE = {
    "position": ("#17becf", "dashdot", "position (sequence + scored span)"),
    "bigram": ("#bcbd22", "longdashdot", "bigram (previous + current token)"),
}
_COVARIATE_COLOURS = ["#8c564b", "#e377c2", "#9467bd", "#2ca02c"]
_COVARIATE_DASHES = ["dash", "longdash", "dashdot", "longdashdot"]


def _control_styles(result: SweepResult) -> list[tuple[str, object, str, str, str]]:
    """(name, baseline Estimate, colour, dash, label) for every control beyond the token mean."""
    out = []
    for name, (colour, dash, label) in _CONTROL_STYLE.items():
        if result.controls.get(f"{name}_r2") is not None:
            out.append((name, result.controls[f"{name}_r2"], colour, dash, label))
    for i, (name, estimate) in enumerate(result.controls.get("covariate_r2", {}).items()):
        out.append(
            (
                name,
                estimate,
                _COVARIATE_COLOURS[i % len(_COVARIATE_COLOURS)],
                _COVARIATE_DASHES[i % len(_COVARIATE_DASHES)],
                f"covariate {name}",
            )
        )
    return out


def _add_control_traces(fig: go.Figure, result: SweepResult, ordered) -> None:
    """Per control: baseline R^2 as a horizontal line + band, the probe on its residual as a curve."""
    depth = [r.depth for r in ordered]
    if not depth:
        return
    x = [min(depth), max(depth)]
    for name, baseline, colour, dash, label in _control_styles(result):
        line = f"{label}: baseline"
        fig.add_trace(_band(x, [baseline.low] * 2, [baseline.high] * 2, colour, line, line, 0.1))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[baseline.value] * 2,
                mode="lines",
                name=line,
                legendgroup=line,
                line={"color": colour, "dash": dash, "width": 1.5},
                hovertemplate=f"{label} baseline R^2 {baseline}<extra></extra>",
            )
        )
        members = [r for r in ordered if name in r.beyond_r2]
        if not members:
            continue
        curve = f"probe on target minus {name} baseline"
        fig.add_trace(
            _band(
                [r.depth for r in members],
                [r.beyond_r2[name].low for r in members],
                [r.beyond_r2[name].high for r in members],
                colour,
                curve,
                curve,
                0.12,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[r.depth for r in members],
                y=[r.beyond_r2[name].value for r in members],
                mode="lines+markers",
                name=curve,
                legendgroup=curve,
                marker={"symbol": "square", "size": 6},
                line={"color": colour, "dash": "dot"},
                customdata=[[r.hook, r.beyond_r2[name].low, r.beyond_r2[name].high] for r in members],
                hovertemplate=(
                    "%{customdata[0]}<br>R^2 beyond " + name
                    + " %{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}]<extra></extra>"
                ),
            )
        )


def _kind(hook: str) -> str:
    """One curve per kind of hook; ``hook_resid_pre/mid/post`` are all the residual stream."""
    kind = hook_kind(hook)
    return "residual stream" if kind.startswith("hook_resid_") else kind


def _band(x, low, high, color: str, name: str, group: str, opacity: float = 0.18) -> go.Scatter:
    return go.Scatter(
        x=list(x) + list(x)[::-1],
        y=list(high) + list(low)[::-1],
        fill="toself",
        mode="lines",
        fillcolor=color,
        opacity=opacity,
        line={"width": 0},
        hoverinfo="skip",
        name=name,
        legendgroup=group,
        showlegend=False,
    )


def layer_sweep_figure(result: SweepResult, title: str | None = None) -> go.Figure:
    """Held-out R^2 per hook depth with 95% CI bands, beside the controls.

    Curves: the probe (one per kind of hook, e.g. ``hook_resid_post``); the probe on the target
    minus its token-identity mean (what the activations add beyond the token's identity); the
    shuffled-label control (mean, band = min..max over shuffles). Horizontal line + band: the
    per-token-type mean baseline. The embedding-layer probe is marked at ``embed``. Each further
    control (position, bigram, covariates) has one colour: its baseline R^2 as a horizontal
    line in its own dash, and the probe on the target minus that baseline as a dotted curve.
    """
    fig = go.Figure()
    rows = [r for r in result.hooks if np.isfinite(r.depth)]
    kinds = list(dict.fromkeys(_kind(r.hook) for r in rows))
    for i, kind in enumerate(kinds):
        members = sorted((r for r in rows if _kind(r.hook) == kind), key=lambda r: r.depth)
        depth = [r.depth for r in members]
        color = _PALETTE[i % len(_PALETTE)]
        label = f"probe ({kind})" if len(kinds) > 1 else "probe"
        fig.add_trace(
            _band(
                depth,
                [r.r2.low for r in members],
                [r.r2.high for r in members],
                color,
                label,
                label,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=depth,
                y=[r.r2.value for r in members],
                mode="lines+markers",
                name=label,
                legendgroup=label,
                line={"color": color, "width": 2.5},
                customdata=[
                    [
                        r.hook,
                        r.alpha,
                        r.pearson_r.value,
                        r.r2.low,
                        r.r2.high,
                        r.shuffle_p,
                        r.selectivity,
                    ]
                    for r in members
                ],
                hovertemplate=(
                    "%{customdata[0]}<br>R^2 %{y:.3f} [%{customdata[3]:.3f}, %{customdata[4]:.3f}]"
                    "<br>r %{customdata[2]:.3f}<br>alpha %{customdata[1]:.3g}"
                    "<br>shuffle p %{customdata[5]:.3f}<br>R^2 - token mean %{customdata[6]:.3f}<extra></extra>"
                ),
            )
        )
    ordered = sorted(rows, key=lambda r: r.depth)
    depth = [r.depth for r in ordered]
    residual_color = "#ff7f0e"
    label = "probe on target minus token mean"
    fig.add_trace(
        _band(
            depth,
            [r.residual_r2.low for r in ordered],
            [r.residual_r2.high for r in ordered],
            residual_color,
            label,
            label,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=depth,
            y=[r.residual_r2.value for r in ordered],
            mode="lines+markers",
            name=label,
            legendgroup=label,
            line={"color": residual_color, "dash": "dot"},
            customdata=[[r.hook] for r in ordered],
            hovertemplate="%{customdata[0]}<br>residual R^2 %{y:.3f}<extra></extra>",
        )
    )
    shuffles = [r for r in ordered if r.shuffle_r2]
    if shuffles:
        label = f"shuffled labels ({len(shuffles[0].shuffle_r2)} shuffles)"
        grey = SHUFFLE_COLOUR
        x = [r.depth for r in shuffles]
        fig.add_trace(
            _band(
                x,
                [min(r.shuffle_r2) for r in shuffles],
                [max(r.shuffle_r2) for r in shuffles],
                grey,
                label,
                label,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[float(np.mean(r.shuffle_r2)) for r in shuffles],
                mode="lines",
                name=label,
                legendgroup=label,
                line={"color": grey, "dash": "dash"},
                hovertemplate="shuffled R^2 %{y:.4f}<extra></extra>",
            )
        )
    token_mean = result.controls["token_mean_r2"]
    if depth:
        x = [min(depth), max(depth)]
        label = "token-identity mean"
        fig.add_trace(
            _band(x, [token_mean.low] * 2, [token_mean.high] * 2, TOKEN_IDENTITY_COLOUR, label, label, 0.14)
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[token_mean.value] * 2,
                mode="lines",
                name=label,
                legendgroup=label,
                line={"color": TOKEN_IDENTITY_COLOUR, "dash": "longdash", "width": 2},
                hovertemplate=f"token-identity mean R^2 {token_mean}<extra></extra>",
            )
        )
    _add_control_traces(fig, result, ordered)
    embedding = next((r for r in rows if r.hook == EMBEDDING_HOOK), None)
    if embedding is not None:
        fig.add_trace(
            go.Scatter(
                x=[embedding.depth],
                y=[embedding.r2.value],
                mode="markers",
                marker={"symbol": "diamond-open", "size": 14, "color": TOKEN_IDENTITY_COLOUR, "line": {"width": 2}},
                name="embedding probe (token identity)",
                hovertemplate=f"{EMBEDDING_HOOK}<br>R^2 {embedding.r2}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title
        or (
            f"Linear probe for {result.target} — {result.model_id} "
            f"({result.n_tokens} tokens, {result.n_sequences} sequences, {result.config['n_folds']}-fold grouped CV)"
        ),
        xaxis=_layer_axis(result),
        yaxis_title="held-out R² (95% CI over sequences)",
        template="plotly_white",
        hovermode="closest",
        legend={"orientation": "h", "yanchor": "top", "y": -0.18},
    )
    return fig


def _layer_axis(result: SweepResult) -> dict:
    """x axis ticks named by layer index as TransformerLens users read them (``embed``, ``0``,
    ``17``: ``blocks.17.hook_resid_post``), placed in residual-stream order."""
    ticks = sorted({(r.depth, layer_label(r.hook)) for r in result.hooks if np.isfinite(r.depth)})
    return {
        "title": {"text": "layer (L = blocks.L.hook_resid_post; embed = blocks.0.hook_resid_pre)"},
        "tickmode": "array",
        "tickvals": [depth for depth, _ in ticks],
        "ticktext": [label for _, label in ticks],
    }


def alpha_curve_figure(result: SweepResult, hooks: list[str] | None = None) -> go.Figure:
    """Pooled held-out R^2 against the ridge alpha, one line per hook (is the grid wide enough?)."""
    alphas = result.config["alphas"]
    fig = go.Figure()
    for r in result.hooks:
        if hooks is not None and r.hook not in hooks:
            continue
        fig.add_trace(go.Scatter(x=alphas, y=r.cv_r2_by_alpha, mode="lines+markers", name=r.hook))
    fig.update_layout(
        xaxis={"type": "log", "title": "ridge alpha (on standardised features)"},
        yaxis_title="held-out R² (outer folds)",
        template="plotly_white",
        title=f"Ridge alpha grid — {result.target}",
    )
    return fig


def source_figure(result: SweepResult) -> go.Figure:
    """Per source label (e.g. own samples vs human text): held-out R^2 and calibration slope by depth.

    Left: R^2 within each source (around that source's mean), 95% CI bands over its sequences.
    Right: slope of the target regressed on the probe's prediction (1 = calibrated; below 1 the
    probe over-spreads its predictions on that source), with CI bands.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out R² by source", "calibration slope (target on prediction)"))
    for i, (label, scores) in enumerate(sorted(result.by_source.items())):
        hooks = scores.get("hooks")
        if not hooks:
            continue
        colour = _PALETTE[i % len(_PALETTE)]
        rows = sorted(
            ((result[h].depth, h, v) for h, v in hooks.items() if np.isfinite(result[h].depth)),
            key=lambda item: item[0],
        )
        depth = [d for d, _, _ in rows]
        name = f"{label} ({scores['n_sequences']} seq, {scores['n_tokens']} tok)"
        for col, key in ((1, "r2"), (2, "calibration_slope")):
            fig.add_trace(
                _band(depth, [v[key].low for _, _, v in rows], [v[key].high for _, _, v in rows], colour, name, name),
                row=1,
                col=col,
            )
            fig.add_trace(
                go.Scatter(
                    x=depth,
                    y=[v[key].value for _, _, v in rows],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": colour, "dash": "solid" if i == 0 else "dash"},
                    customdata=[[h, v[key].low, v[key].high] for _, h, v in rows],
                    hovertemplate="%{customdata[0]}<br>%{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}]<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.add_hline(y=1.0, line={"color": "#7f7f7f", "dash": "dot", "width": 1}, row=1, col=2)
    fig.update_xaxes(**_layer_axis(result))
    fig.update_layout(
        title=f"{result.target} probe by source — {result.model_id}",
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "top", "y": -0.18},
    )
    return fig
