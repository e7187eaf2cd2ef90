"""Plotly figures for per-token metrics. Each function returns a ``go.Figure``; nothing is shown.

Write one with ``write_html(fig, path)`` (plotly.js embedded, so it opens offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["token_view", "entropy_by_position", "write_html", "write_report"]


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """Self-contained HTML (plotly.js inlined), so it opens with no network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def write_report(figures: Sequence[tuple[str, go.Figure]], path: str | Path, title: str, intro: str = "") -> Path:
    """Several figures in one self-contained HTML page (plotly.js inlined once)."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body "
             "style='font-family: sans-serif; max-width: 1200px; margin: auto'>",
             f"<h1>{title}</h1><p>{intro}</p>"]
    for i, (heading, fig) in enumerate(figures):
        parts.append(f"<h2>{heading}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def token_view(
    tokens: Sequence[str],
    input_surprise: np.ndarray,
    output_entropy: np.ndarray,
    scored: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
    width: int = 16,
    title: str = "",
) -> go.Figure:
    """Tokens laid out as text in a grid, coloured by input surprise; hover shows every metric.

    ``extra`` adds hover rows such as ``{"probe prediction": ..., "steering effect": ...}``.
    Unscored tokens are drawn faded. A second panel shows the same tokens coloured by entropy.
    """
    n = len(tokens)
    scored = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    rows = (n + width - 1) // width
    grid_x = np.arange(n) % width
    grid_y = np.arange(n) // width
    hover = []
    for i, token in enumerate(tokens):
        lines = [f"pos {i}: {token!r}", f"input surprise {input_surprise[i]:.3f} nats",
                 f"output entropy {output_entropy[i]:.3f} nats", "scored" if scored[i] else "not scored"]
        for name, values in (extra or {}).items():
            lines.append(f"{name} {values[i]:.3f}")
        hover.append("<br>".join(lines))
    fig = make_subplots(rows=2, cols=1, subplot_titles=("input surprise s_t (nats)", "output entropy H_t (nats)"),
                        vertical_spacing=0.08)
    labels = [t.replace("\n", "\\n")[:10] for t in tokens]
    for panel, (values, scale) in enumerate(((input_surprise, "Reds"), (output_entropy, "Blues")), start=1):
        shown = np.where(np.isfinite(values), values, np.nan)
        fig.add_trace(
            go.Scatter(
                x=grid_x, y=-grid_y, mode="markers+text", text=labels, textfont={"size": 11},
                hovertext=hover, hoverinfo="text",
                marker={"symbol": "square", "size": 38, "color": shown, "colorscale": scale,
                        "opacity": np.where(scored, 1.0, 0.35),
                        "colorbar": {"len": 0.45, "y": 0.78 if panel == 1 else 0.22}},
                showlegend=False,
            ),
            row=panel, col=1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title or "per-token input surprise and output entropy (faded: not scored)",
                      height=220 + 2 * 46 * rows, width=60 * width + 120, plot_bgcolor="white")
    return fig


def entropy_by_position(
    positions: np.ndarray, values: np.ndarray, groups: dict[str, np.ndarray], max_position: int = 64,
    metric: str = "output entropy",
) -> go.Figure:
    """Mean of a per-token metric by position in the scored span, one line per group (e.g. source).

    ``groups`` maps a label to a boolean mask over tokens. Shows the token count per point on hover.
    """
    fig = go.Figure()
    for label, mask in groups.items():
        xs, means, counts = [], [], []
        for p in range(max_position):
            sel = mask & (positions == p) & np.isfinite(values)
            if sel.sum() == 0:
                continue
            xs.append(p)
            means.append(values[sel].mean())
            counts.append(int(sel.sum()))
        fig.add_trace(go.Scatter(x=xs, y=means, mode="lines+markers", name=label,
                                 customdata=counts, hovertemplate="position %{x}<br>mean %{y:.3f}<br>n=%{customdata}"))
    fig.update_layout(xaxis_title="position in scored span", yaxis_title=f"mean {metric} (nats)",
                      title=f"{metric} by position")
    return fig
