"""The page: a report header and its sections written as one self-contained ``report.html``.

:func:`write_report_html` lays out the header (models, data, date, total time, versions), a table
of contents, the key numbers, and one block per section (status badge, caption, error, numbers
table, sample, time, JSON links, then its fragments and figures). It writes through the project's
HTML writer (:func:`surprise_probe.core.utils.plots.write_report`, plotly.js inlined once), so the
file opens offline.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

import plotly.graph_objects as go

from surprise_probe.core.utils.plots import write_report
from surprise_probe.report.values import STATUS_OK, Number, ReportHeader, StageSection

__all__ = ["write_report_html"]

_CSS = """
<style>
body{max-width:1240px !important;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:26px;margin:18px 0 6px}
.sp-header table{border-collapse:collapse;font-size:14px}.sp-header td{padding:2px 14px 2px 0;vertical-align:top}
.sp-header .versions{font-size:12px;color:#555}
.sp-toc{font-size:14px;margin:10px 0 4px;padding:8px 12px;background:#f6f7f9;border-radius:6px}
.sp-toc a{margin-right:4px}
section{border-top:1px solid #ddd;margin-top:26px;padding-top:4px}
section h2{font-size:20px;margin:12px 0 6px}
.sp-status{display:inline-block;font-size:12px;font-weight:bold;padding:1px 8px;border-radius:10px;margin-left:8px;vertical-align:middle}
.sp-status.ok{background:#e3f4e6;color:#1d6b2c}.sp-status.failed,.sp-status.missing{background:#fde4e1;color:#a11d0f}
.sp-status.skipped{background:#fff1d6;color:#8a5a00}
.sp-caption{font-size:14px;color:#333;margin:4px 0 8px}
.sp-error{background:#fde4e1;border-left:4px solid #c0392b;padding:6px 10px;font-family:monospace;font-size:13px;white-space:pre-wrap}
table.sp-numbers{border-collapse:collapse;font-size:13.5px;margin:6px 0 10px;width:100%}
table.sp-numbers th{text-align:left;background:#f1f3f5;padding:4px 8px;border-bottom:1px solid #ccc}
table.sp-numbers td{padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
.sp-meta{font-size:12.5px;color:#555}
.js-plotly-plot,.plotly-graph-div{max-width:100%}
section:has(> h2:empty){border-top:none;margin-top:4px;padding-top:0}
h2:empty{display:none}
</style>
"""


def _status_badge(status: str) -> str:
    kind = "ok" if status in STATUS_OK else status if status in ("failed", "skipped", "missing") else "failed"
    return f"<span class='sp-status {kind}'>{escape(status)}</span>"


def _relative(path: Path, report: Path) -> str:
    try:
        return Path(path).resolve().relative_to(report.parent.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()


def _numbers_table(numbers: Sequence[Number]) -> str:
    if not numbers:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("measure", "effect", "95% CI", "control beside it", "sample"))
    rows = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in number.cells()) + "</tr>" for number in numbers)
    return f"<table class='sp-numbers'><tr>{head}</tr>{rows}</table>"


def _section_head(section: StageSection, report: Path) -> str:
    parts = [f"<a id='stage-{escape(section.key)}'></a>{_status_badge(section.status)}"]
    if section.caption:
        parts.append(f"<div class='sp-caption'>{section.caption}</div>")
    if section.error:
        parts.append(f"<div class='sp-error'>{escape(section.error)}</div>")
    parts.append(_numbers_table(section.numbers))
    meta = []
    if section.sample:
        meta.append(f"sample: {escape(section.sample)}")
    if section.seconds is not None:
        meta.append(f"time: {section.seconds:.1f} s")
    for path in section.json_paths:
        meta.append(f"<a href='{escape(_relative(path, report))}'>{escape(Path(path).name)}</a>")
    if meta:
        parts.append(f"<div class='sp-meta'>{' · '.join(meta)}</div>")
    return "\n".join(parts)


def _wrap_title(text: str, width: int = 95) -> str:
    if "<br>" in text or len(text) <= width:
        return text
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "<br>".join(lines)


def _fit_width(fig: go.Figure) -> go.Figure:
    """A copy that fills the page width (no fixed pixel width), long titles wrapped, so nothing is clipped."""
    fig = go.Figure(fig)
    title = fig.layout.title.text or ""
    wrapped = _wrap_title(title)
    top = max(fig.layout.margin.t or 80, 60 + 24 * (wrapped.count("<br>") + 1))
    fig.update_layout(width=None, autosize=True, title_text=wrapped or None, margin={"t": top})
    return fig


def write_report_html(path: str | Path, header: ReportHeader, sections: Iterable[StageSection]) -> Path:
    """Write the report (header, contents, one block per section) as one self-contained page."""
    path = Path(path)
    sections = list(sections)
    date = header.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = f"{header.total_seconds:.0f} s ({header.total_seconds / 60:.1f} min)" if header.total_seconds else "n/a"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(header.versions.items()))
    failed = [s for s in sections if not s.ok]
    rows = [("models", ", ".join(header.models)), ("data", header.data), ("date", date), ("total time", total),
            ("stages", f"{len(sections) - len(failed)} of {len(sections)} ok"
                       + (f"; not ok: {', '.join(s.title for s in failed)}" if failed else ""))]
    if header.notes:
        rows.append(("settings", header.notes))
    key_rows = "".join(
        f"<tr><td><a href='#stage-{escape(s.key)}'>{escape(s.title)}</a></td>"
        + "".join(f"<td>{escape(cell)}</td>" for cell in s.numbers[0].cells()) + "</tr>"
        for s in sections if s.ok and s.numbers)
    key_numbers = ("<h2 style='font-size:18px;margin:14px 0 4px'>Key numbers</h2><table class='sp-numbers'><tr>"
                   + "".join(f"<th>{h}</th>" for h in ("stage", "measure", "effect", "95% CI", "control beside it",
                                                       "sample"))
                   + f"</tr>{key_rows}</table>") if key_rows else ""
    toc = " · ".join(f"<a href='#stage-{escape(s.key)}'>{escape(s.title)}</a>{'' if s.ok else ' (' + escape(s.status) + ')'}"
                     for s in sections)
    intro = (
        _CSS + "<div class='sp-header'><table>"
        + "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(v)}</td></tr>" for k, v in rows)
        + f"</table><div class='versions'>software: {escape(versions)}</div></div>"
        + f"<div class='sp-toc'>{toc}</div>" + key_numbers
    )
    blocks: list[tuple[str, go.Figure | str]] = []
    for section in sections:
        blocks.append((section.title, _section_head(section, path)))
        for fragment in section.fragments:
            blocks.append(("", fragment))
        for fig in section.figures:
            blocks.append(("", _fit_width(fig)))
    return write_report(blocks, path, header.title, intro)
