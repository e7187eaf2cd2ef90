"""Plotly figures for per-token metrics. Each function returns a ``go.Figure``; nothing is shown.

Write one with :func:`write_html` (plotly.js embedded, so it opens offline), several into one
page with :func:`write_report` (plotly.js embedded once). These two are the project's HTML writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from surprise_probe.core.utils.jsonio import write_text

__all__ = ["token_view", "entropy_by_position", "write_html", "write_report", "wrap_text"]


def wrap_text(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters at spaces, joined by ``<br>`` (plotly).

    >>> wrap_text("one two three four", 9)
    'one two<br>three<br>four'
    """
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join([*lines, line])


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """One figure as a self-contained HTML page (plotly.js inlined, so it opens with no network).

    The project's one HTML writer, with :func:`write_report` for several figures. Written
    atomically; the output is deterministic (fixed element ids), so a rerun gives the same file.

    >>> import tempfile
    >>> path = write_html(go.Figure(go.Scatter(y=[1, 3, 2])), Path(tempfile.mkdtemp()) / "f.html")
    >>> text = path.read_text(encoding="utf-8")
    >>> "<script src=" in text, len(text) > 1_000_000     # nothing fetched; plotly.js inside
    (False, True)
    """
    html = fig.to_html(full_html=True, include_plotlyjs=True, div_id="figure")
    return _write(path, html)


def write_report(
    sections: Sequence[tuple[str, go.Figure | str]], path: str | Path, title: str, intro: str = ""
) -> Path:
    """Several figures (and HTML blocks) in one self-contained page; plotly.js is inlined ONCE.

    ``sections``: ``(heading, content)`` pairs, in order; ``content`` is a ``go.Figure`` or an
    HTML fragment inserted as is (a table, a paragraph). ``title`` and headings are plain text
    (escaped; an empty heading adds no ``<h2>``); ``intro`` is an HTML fragment. Written atomically, deterministic like
    :func:`write_html`.

    >>> import tempfile
    >>> fig = go.Figure(go.Bar(y=[1, 2]))
    >>> path = write_report([("a", fig), ("b <2>", fig), ("notes", "<p>text</p>")],
    ...                     Path(tempfile.mkdtemp()) / "r.html", "Report")
    >>> text = path.read_text(encoding="utf-8")
    >>> text.count("<h2>"), text.count("Plotly.newPlot"), "<h2>b &lt;2&gt;</h2>" in text
    (3, 2, True)
    """
    body = [f"<h1>{escape(title)}</h1>", intro]
    figures = 0
    for heading, content in sections:
        body.append(f"<section><h2>{escape(heading)}</h2>" if heading else "<section>")
        if isinstance(content, go.Figure):
            body.append(content.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{figures}"))
            figures += 1
        elif isinstance(content, str):
            body.append(content)
        else:
            raise TypeError(
                f"section {heading!r}: content must be a plotly Figure or an HTML string, got "
                f"{type(content).__name__}"
            )
        body.append("</section>")
    script = f"<script type='text/javascript'>{get_plotlyjs()}</script>" if figures else ""
    html = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>{script}</head>\n"
        "<body style='font-family: sans-serif; max-width: 1200px; margin: auto'>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return _write(path, html)


def _write(path: str | Path, html: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, html)


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

    (The study's report uses the flowing-text view, :func:`surprise_probe.analyses.token_view.token_view_html`.)

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
        # white text on the dark end of the scale, black elsewhere (never dark on dark)
        finite = shown[np.isfinite(shown)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        level = (shown - low) / (high - low) if high > low else np.zeros(n)
        ink = ["#ffffff" if np.isfinite(v) and v > 0.55 else "#000000" for v in level]
        fig.add_trace(
            go.Scatter(
                x=grid_x, y=-grid_y, mode="markers+text", text=labels, textfont={"size": 11, "color": ink},
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
