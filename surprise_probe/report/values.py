"""What a report is made of: sections, their numbers, the header, and the number formatting.

A study's report is a list of :class:`StageSection` (title, status, a two-line caption on how to
read the figure, figures, HTML fragments such as the token view, a numbers table of :class:`Number`
rows with the effect, its CI, the control beside it and the sample size, and links to the stage's
JSON) under a :class:`ReportHeader` (models, data, versions, date, total time).

:func:`result_section` builds a section for any analysis (figures and numbers in hand);
:func:`failed_section` names a stage that failed, was skipped or did not run, with its reason. A
result class can instead render itself: a ``report_section(json_path)`` method returning a
:class:`StageSection` makes it :class:`Reportable`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import plotly.graph_objects as go

from surprise_probe.core.utils.jsonio import software_versions

__all__ = ["Number", "StageSection", "ReportHeader", "Reportable", "failed_section", "result_section"]

STATUS_OK = ("ok", "done", "resumed")


@dataclass
class Number:
    """One row of a section's numbers table: an effect with its CI, its control and its sample."""

    measure: str
    value: float | str
    ci: tuple[float, float] | None = None
    control: str = ""  # the control beside the effect, as text (e.g. "random directions 0.01 +/- 0.02")
    n: str = ""  # sample size (e.g. "8 sequences, 412 tokens")
    unit: str = ""

    def cells(self) -> list[str]:
        value = _fmt(self.value) + (f" {self.unit}" if self.unit and _is_number(self.value) else "")
        ci = f"[{_fmt(self.ci[0])}, {_fmt(self.ci[1])}]" if self.ci is not None else "n/a"
        return [self.measure, value, ci, self.control or "", self.n or ""]


@dataclass
class StageSection:
    """What the report shows for one stage. ``status``: ok / done / resumed / failed / skipped / missing."""

    key: str
    title: str
    status: str = "ok"
    caption: str = ""  # two lines: what is plotted; how to read it
    figures: list[go.Figure] = field(default_factory=list)
    fragments: list[str] = field(default_factory=list)  # HTML blocks (e.g. the token view)
    numbers: list[Number] = field(default_factory=list)
    json_paths: list[Path] = field(default_factory=list)
    sample: str = ""  # sample size in words
    error: str = ""
    seconds: float | None = None
    time_note: str = ""  # where its time is counted when it has none of its own (e.g. "in the attribution stage")

    @property
    def ok(self) -> bool:
        return self.status in STATUS_OK


@dataclass
class ReportHeader:
    """The report's header: models, data, software versions, date and total time."""

    title: str
    models: list[str]
    data: str
    date: str = ""
    total_seconds: float | None = None
    versions: dict = field(default_factory=software_versions)
    notes: str = ""


@runtime_checkable
class Reportable(Protocol):
    """A result that renders itself as a section (e.g. the policy gap or cached intention)."""

    def report_section(self, json_path: Path | None = None) -> StageSection: ...


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if not _is_number(value):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _ci(estimate) -> tuple[float, float] | None:
    """``(low, high)``, or None where there is no interval (either bound missing: JSON writes NaN as null)."""
    if isinstance(estimate, Mapping) and "low" in estimate and "high" in estimate:
        bounds = (estimate["low"], estimate["high"])
    elif isinstance(estimate, (list, tuple)) and len(estimate) == 2:
        bounds = (estimate[0], estimate[1])
    else:
        return None
    return None if None in bounds else bounds


def _value(estimate):
    if isinstance(estimate, Mapping):
        return estimate.get("value", estimate.get("mean"))
    return estimate


def failed_section(key: str, title: str, error: str, status: str = "failed", seconds: float | None = None,
                   json_paths: Sequence[Path] = ()) -> StageSection:
    """A stage that failed / was skipped / did not run: named in the report with its reason."""
    return StageSection(key, title, status=status, error=error or "no reason recorded", seconds=seconds,
                        json_paths=list(json_paths))


def result_section(
    key: str,
    title: str,
    *,
    caption: str,
    figures: Sequence[go.Figure] = (),
    numbers: Sequence[Number] = (),
    json_path: str | Path | None = None,
    sample: str = "",
    fragments: Sequence[str] = (),
    seconds: float | None = None,
) -> StageSection:
    """A section for any analysis (the hook for the policy gap and cached intention stages)."""
    return StageSection(key, title, caption=caption, figures=list(figures), numbers=list(numbers),
                        json_paths=[Path(json_path)] if json_path else [], sample=sample,
                        fragments=list(fragments), seconds=seconds)
