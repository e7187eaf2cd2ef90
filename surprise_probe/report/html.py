"""The page: the verdicts, a report header and its sections written as one self-contained ``report.html``.

:func:`write_report_html` lays out the verdicts first (one row per question: the answer, the
numbers it used and the rule, linked to its section), then the header (models, data, date, total
time, versions), a table of contents, the key numbers, and one block per section (status badge, caption, error, numbers
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

from surprise_probe.core.utils.plots import wrap_text, write_report
from surprise_probe.report.values import STATUS_OK, Number, ReportHeader, StageSection
from surprise_probe.report.verdicts import (
    ANSWERS_EXPLAINED,
    MIXED,
    NO,
    NOT_RUN,
    NOT_TESTED,
    YES,
    Verdict,
)

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
.sp-verdicts{margin:8px 0 14px;padding:8px 12px;border:1px solid #cfd6de;border-radius:6px;background:#fbfcfd}
.sp-verdicts h2{font-size:20px;margin:4px 0 4px}
table.sp-verdicts{border-collapse:collapse;font-size:13.5px;width:100%;margin:6px 0 2px;border:none;padding:0}
table.sp-verdicts th{text-align:left;background:#eef1f4;padding:4px 8px}
table.sp-verdicts td{padding:5px 8px;border-top:1px solid #e3e6ea;vertical-align:top}
table.sp-verdicts td.sp-rule{font-size:12px;color:#555}
.sp-answer{display:inline-block;font-weight:bold;padding:1px 8px;border-radius:10px;white-space:nowrap}
.sp-answer.yes{background:#e3f4e6;color:#1d6b2c}.sp-answer.no{background:#e4ebf5;color:#1f4e8c}
.sp-answer.mixed{background:#fff1d6;color:#8a5a00}.sp-answer.untested{background:#eeeeee;color:#444}
.sp-answer.notrun{background:#fde4e1;color:#a11d0f}
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
    elif section.time_note:
        meta.append(f"time: {escape(section.time_note)}")
    for path in section.json_paths:
        meta.append(f"<a href='{escape(_relative(path, report))}'>{escape(Path(path).name)}</a>")
    if meta:
        parts.append(f"<div class='sp-meta'>{' · '.join(meta)}</div>")
    return "\n".join(parts)


_ANSWER_CLASS = {YES: "yes", NO: "no", MIXED: "mixed", NOT_TESTED: "untested", NOT_RUN: "notrun"}


def _verdicts_block(verdicts: Sequence[Verdict]) -> str:
    """The opening summary: one row per question, with its answer, the numbers and the rule."""
    if not verdicts:
        return ""
    rows = "".join(
        "<tr>"
        + (f"<td><a href='#stage-{escape(v.section)}'>{escape(v.question)}</a></td>" if v.section
           else f"<td>{escape(v.question)}</td>")
        + f"<td><span class='sp-answer {_ANSWER_CLASS.get(v.answer, 'untested')}'>{escape(v.answer)}</span></td>"
        f"<td>{escape(v.numbers)}</td><td class='sp-rule'>{escape(v.rule)}</td></tr>"
        for v in verdicts)
    return ("<div class='sp-verdicts' id='verdicts'><h2>Verdicts</h2>"
            f"<div class='sp-caption'>{escape(ANSWERS_EXPLAINED)}</div><table class='sp-verdicts'>"
            "<colgroup><col style='width:19%'><col style='width:9%'><col style='width:38%'><col style='width:34%'>"
            "</colgroup><tr><th>question</th><th>answer</th><th>the numbers it used</th><th>rule</th></tr>"
            f"{rows}</table></div>")


def _wrap_title(text: str, width: int = 95) -> str:
    return text if "<br>" in text or len(text) <= width else wrap_text(text, width)


def _fit_width(fig: go.Figure) -> go.Figure:
    """A copy that fills the page width (no fixed pixel width), long titles wrapped, so nothing is clipped."""
    fig = go.Figure(fig)
    title = fig.layout.title.text or ""
    wrapped = _wrap_title(title)
    top = max(fig.layout.margin.t or 80, 60 + 24 * (wrapped.count("<br>") + 1))
    fig.update_layout(width=None, autosize=True, title_text=wrapped or None, margin={"t": top})
    return fig


def write_report_html(path: str | Path, header: ReportHeader, sections: Iterable[StageSection],
                      verdicts: Sequence[Verdict] = ()) -> Path:
    """Write the report (verdicts, header, contents, one block per section) as one self-contained page."""
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
        _CSS + _verdicts_block(verdicts) + "<div class='sp-header'><table>"
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
