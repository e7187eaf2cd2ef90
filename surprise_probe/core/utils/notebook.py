"""How results show in a notebook: one small HTML table, short reprs, tables and figures that display.

Every result object mixes in :class:`NotebookView`: its ``repr()`` is one line (the headline
numbers) and Jupyter / VS Code show ``_repr_html_``, a small table of its key numbers with their
CIs and sample sizes, and where it was saved. :func:`html_table` builds that table (and every other
HTML table a notebook shows); :class:`TextTable` and :class:`TableRows` are what ``table()``
returns, a ``str`` or a ``list`` of dicts as before that a notebook displays as a table.
:func:`use_offline_plotly` makes figures display in notebooks without a network.

>>> html = html_table([("R^2", ci_text(0.625, 0.611, 0.639)), ("sequences", "60")], caption="sweep <1>")
>>> "sweep &lt;1&gt;</caption>" in html, html.count("<tr>")
(True, 2)
>>> ci_text(0.625, 0.611, 0.639), ci_text(0.0012, None, None), ci_text(float("nan"))
('0.625 [0.611, 0.639]', '0.0012', 'n/a')
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path

import numpy as np
import plotly.io as pio
from plotly.io.base_renderers import NotebookRenderer

__all__ = [
    "html_table",
    "number_text",
    "ci_text",
    "estimate_text",
    "saved_text",
    "NotebookView",
    "TextTable",
    "TableRows",
    "in_notebook",
    "use_offline_plotly",
    "MAX_REPR",
]

MAX_REPR = 300  # characters of a one-line repr
_MAX_ROWS = 200  # rows of a table a notebook shows (the object itself keeps them all)
_STYLE = "border-collapse: collapse; font-size: 12px; margin: 4px 0"


def number_text(value, digits: int = 3) -> str:
    """A number for a table cell: ``n/a`` for None or NaN, small values in significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return str(value if isinstance(value, (bool, np.bool_)) else int(value))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else str(value)
    value += 0.0  # -0.0 prints as 0
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.{max(digits - 1, 1)}g}"
    return f"{value:.{digits}f}"


def ci_text(value, low=None, high=None, digits: int = 3) -> str:
    """``value [low, high]``, or the value alone when the interval is missing or undefined."""
    text = number_text(value, digits)
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return text
    return f"{text} [{number_text(low, digits)}, {number_text(high, digits)}]"


def estimate_text(estimate, digits: int = 3) -> str:
    """An ``Estimate`` / ``MeanWithCI`` (or its dict, or None) as ``value [low, high]``."""
    if estimate is None:
        return "n/a"
    if isinstance(estimate, Mapping):
        value = estimate.get("value", estimate.get("mean"))
        return ci_text(value, estimate.get("low"), estimate.get("high"), digits)
    value = getattr(estimate, "value", getattr(estimate, "mean", None))
    return ci_text(value, getattr(estimate, "low", None), getattr(estimate, "high", None), digits)


def html_table(rows: Iterable[Sequence], caption: str = "", header: Sequence[str] | None = None) -> str:
    """The project's one HTML table for notebooks: every cell and the caption escaped as text.

    ``rows``: sequences of cells (``(label, value)`` pairs for a summary); ``header``: column names.
    At most 200 rows are shown; a last row says how many more there are.
    """
    rows = list(rows)
    left = 'style="text-align: left"'
    parts = [f'<table class="surprise-probe" style="{_STYLE}">']
    if caption:
        parts.append(f'<caption style="text-align: left; font-weight: bold">{escape(caption)}</caption>')
    if header:
        parts.append("<thead><tr>" + "".join(f"<th {left}>{escape(str(h))}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows[:_MAX_ROWS]:
        cells = [escape(str(value)) for value in row]
        if not header and len(cells) == 2:  # a summary: label, value
            parts.append(f"<tr><th {left}>{cells[0]}</th><td {left}>{cells[1]}</td></tr>")
        else:
            parts.append("<tr>" + "".join(f"<td {left}>{c}</td>" for c in cells) + "</tr>")
    if len(rows) > _MAX_ROWS:
        width = len(header) if header else 2
        parts.append(f'<tr><td colspan="{width}" {left}>... {len(rows) - _MAX_ROWS} more rows</td></tr>')
    parts.append("</tbody></table>")
    return "".join(parts)


def saved_text(written) -> str:
    """Where ``save`` wrote: the folder and its file names (a dict of paths, or one path)."""
    if written is None:
        return "not saved (call .save(folder))"
    if isinstance(written, Mapping):
        paths = [Path(p) for p in written.values() if isinstance(p, (str, Path))]
    else:
        paths = [Path(written)]
    if not paths:
        return "not saved (call .save(folder))"
    folders = {p.parent for p in paths}
    names = ", ".join(sorted(p.name for p in paths))
    where = f"{next(iter(folders))}/ ({names})" if len(folders) == 1 else ", ".join(str(p) for p in paths)
    return where if len(where) <= 160 else where[:157] + "..."


def _remember(save):
    """``save`` that also records what it wrote, for the notebook view's "saved" row."""

    @functools.wraps(save)
    def remembering_save(self, *args, **kwargs):
        written = save(self, *args, **kwargs)
        object.__setattr__(self, "_saved_to", written)  # frozen dataclasses too; not a field
        return written

    return remembering_save


class NotebookView:
    """Mixin for result objects: a one-line ``repr`` and a small HTML table in notebooks.

    A class supplies ``_view() -> (headline, rows)``: the headline (key number and sample size,
    one line) and ``(label, value text)`` rows. ``repr()`` is ``ClassName(headline)``; notebooks
    show ``_repr_html_``, the rows plus where ``save`` last wrote. Dataclasses using it are
    declared with ``@dataclass(repr=False)`` so this ``__repr__`` is theirs.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "save" in cls.__dict__:
            cls.save = _remember(cls.__dict__["save"])

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        text = f"{type(self).__name__}({self._view()[0]})"
        return text if len(text) <= MAX_REPR else text[: MAX_REPR - 4] + "...)"

    def _repr_html_(self) -> str:
        rows = list(self._view()[1])
        if hasattr(type(self), "save"):
            rows.append(("saved", saved_text(getattr(self, "_saved_to", None))))
        return html_table(rows, caption=type(self).__name__)


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


class TextTable(str):
    """A table as plain text (``print`` shows it exactly as before) that a notebook shows as a table.

    >>> t = TextTable("a  b\\n1  2", ["a", "b"], [[1, 2]])
    >>> print(t)
    a  b
    1  2
    >>> "<td" in t._repr_html_(), t._repr_markdown_().splitlines()[0]
    (True, '| a | b |')
    """

    def __new__(cls, text: str, header: Sequence[str] = (), rows: Sequence[Sequence] = ()):
        table = super().__new__(cls, text)
        table.header = list(header)
        table.rows = [list(row) for row in rows]
        return table

    def _repr_html_(self) -> str:
        return html_table(self.rows, header=self.header)

    def _repr_markdown_(self) -> str:
        lines = ["| " + " | ".join(map(_markdown_cell, self.header)) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in self.rows]
        return "\n".join(lines)


class TableRows(list):
    """One plain dict per row, as before (a ``list``), that a notebook shows as a table.

    >>> rows = TableRows([{"hook": "blocks.0.hook_resid_post", "r2": 0.5}, {"hook": "x", "r2": None}])
    >>> rows[0]["r2"], "n/a" in rows._repr_html_()
    (0.5, True)
    """

    def _repr_html_(self) -> str:
        columns: dict[str, None] = {}
        for row in self:
            columns.update(dict.fromkeys(row))
        cells = [[_cell(row.get(name)) for name in columns] for row in self]
        return html_table(cells, header=list(columns))


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return value if isinstance(value, str) else number_text(value, 4)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, Notebook, VS Code, nbclient)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython()
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


class _OfflineNotebookRenderer(NotebookRenderer):
    """plotly's ``notebook`` renderer (plotly.js embedded once, on the first figure shown), without
    the MathJax script it would fetch from a CDN."""

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                           full_html=False, default_width="100%", default_height=525, validate=False)
        return {"text/html": html}


OFFLINE_RENDERER = "surprise_probe_offline"
# What plotly picks by itself in a kernel; a renderer the user chose is left alone.
_PLOTLY_AUTOMATIC = {"plotly_mimetype", "vscode", "plotly_mimetype+notebook"}


def use_offline_plotly() -> str | None:
    """In a notebook, show figures as plotly's JSON (JupyterLab and VS Code draw it) plus offline
    HTML (plotly.js embedded once, in the first figure's output; nothing fetched), so they also
    show in viewers and exports without plotly's extension. ``import surprise_probe`` calls it.
    Returns the renderer set, or None: not a notebook, or a renderer the user chose (in code or
    ``PLOTLY_RENDERER``), which is left as it is."""
    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = _OfflineNotebookRenderer()
    if not in_notebook() or os.environ.get("PLOTLY_RENDERER") or pio.renderers.default not in _PLOTLY_AUTOMATIC:
        return None
    pio.renderers.default = f"plotly_mimetype+{OFFLINE_RENDERER}"
    return pio.renderers.default
