"""A study folder as a report: the verdicts, then each stage's section, in the study's order.

:func:`write_study_report` is what the study calls: it reads ``study.json`` (settings, each stage's
status and time), judges the study's questions with :func:`study_verdicts` (the rules of
:mod:`surprise_probe.report.verdicts`, applied to what the stages saved), builds the sections with
:func:`study_sections` from the :class:`SectionSpec` list the study's stages carry, and writes
``report.html`` with :func:`surprise_probe.report.html.write_report_html`. A stage that failed or
did not run is named with its error, never left out, and its question is answered "not run".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from surprise_probe.core.utils.jsonio import read_json, software_versions
from surprise_probe.report.html import write_report_html
from surprise_probe.report.values import (
    STATUS_OK,
    Reportable,
    ReportHeader,
    StageSection,
    failed_section,
)
from surprise_probe.report.verdicts import QUESTIONS, Verdict, not_run

__all__ = ["SectionSpec", "study_sections", "study_verdicts", "write_study_report"]


@dataclass(frozen=True)
class SectionSpec:
    """A report section of a study stage: its key in ``study.json``, title, folder, and reader.

    ``read(folder) -> StageSection`` builds the section from the stage's saved results. The study
    (``surprise_probe.app.study``) gives each of its stages its sections, so the list of stages
    exists once; the report only renders them in the order given.
    """

    key: str
    title: str
    folder: str
    read: Callable[[Path], StageSection] | None
    status_of: str | None = None  # the stage whose status this section shows, when not ``key``
    question: str | None = None  # the verdict judged from this section's results (a key of verdicts.QUESTIONS)


def study_sections(
    out: str | Path,
    sections: Sequence[SectionSpec],
    stages: Mapping[str, Mapping] | None = None,
    extra: Mapping[str, StageSection | Reportable] | None = None,
) -> list[StageSection]:
    """Sections for a study folder, in the order of ``sections``, then any other stage in ``stages``.

    ``stages``: the study's per-stage status (``study.json``'s ``stages``: status, seconds, error);
    read from ``out/study.json`` when not given. ``extra``: sections (or ``Reportable`` results)
    for stages without an adapter here, by stage name (``"gap"``, ``"intention"``). A stage that
    failed, was skipped or whose JSON is missing becomes a section naming why.
    """
    out = Path(out)
    if stages is None:
        stages = read_json(out / "study.json").get("stages", {}) if (out / "study.json").exists() else {}
    extra = dict(extra or {})
    specs, sections = list(sections), []
    known = {spec.key for spec in specs} | {spec.status_of for spec in specs if spec.status_of}
    for spec in specs:
        name, title, folder, adapter = spec.key, spec.title, spec.folder, spec.read
        record = stages.get(name) or stages.get(spec.status_of or name)
        status = (record or {}).get("status")
        seconds = (record or {}).get("seconds")
        if status is not None and status not in STATUS_OK:
            sections.append(failed_section(name, title, (record or {}).get("error", ""), status=status, seconds=seconds))
            continue
        if name in extra:
            section = extra[name]
            section = section.report_section() if isinstance(section, Reportable) else section
            section.seconds = section.seconds if section.seconds is not None else seconds
            sections.append(section)
            continue
        if adapter is None or not (out / folder).is_dir():
            if record is not None:  # recorded as finished, but nothing to show: say so
                sections.append(failed_section(name, title, f"the study recorded {status!r} but {out / folder} "
                                               "has no results this report can read", status="missing", seconds=seconds))
            continue
        try:
            section = adapter(out / folder)
        except Exception as error:  # noqa: BLE001 - one unreadable stage must not take the report down
            sections.append(failed_section(name, title, f"could not read its results: {type(error).__name__}: {error}",
                                           status="missing" if isinstance(error, FileNotFoundError) else "failed",
                                           seconds=seconds))
            continue
        if spec.status_of:  # computed inside another stage: its time is that stage's, not shown twice
            section.seconds, section.time_note = None, f"included in the {spec.status_of} stage's time"
        else:
            section.seconds = seconds
        sections.append(section)
    for name, record in stages.items():
        if name in known or name == "report":
            continue
        if name in extra:
            section = extra[name]
            sections.append(section.report_section() if isinstance(section, Reportable) else section)
        elif record.get("status") not in STATUS_OK:
            sections.append(failed_section(name, name, record.get("error", ""), status=record.get("status", "failed"),
                                           seconds=record.get("seconds")))
    return sections


def study_verdicts(
    out: str | Path,
    sections: Sequence[SectionSpec],
    stages: Mapping[str, Mapping] | None = None,
) -> list[Verdict]:
    """The answer to each question the ``sections`` carry (``SectionSpec.question``), in their order.

    Each is judged by its rule (:data:`surprise_probe.report.verdicts.QUESTIONS`) from the file
    the stage saved; a stage that failed, was skipped or saved nothing readable gives "not run".
    """
    out = Path(out)
    if stages is None:
        stages = read_json(out / "study.json").get("stages", {}) if (out / "study.json").exists() else {}
    verdicts = []
    for spec in sections:
        if not spec.question:
            continue
        question = QUESTIONS[spec.question]
        record = stages.get(spec.key) or stages.get(spec.status_of or spec.key) or {}
        path = out / spec.folder / question.file
        if record.get("status") is not None and record["status"] not in STATUS_OK:
            verdict = not_run(spec.question, f"the {spec.key} stage {record['status']}: "
                                             f"{record.get('error') or 'no reason recorded'}")
        elif not path.exists():
            verdict = not_run(spec.question, f"{path} does not exist")
        else:
            try:
                verdict = question.judge(read_json(path))
            except Exception as error:  # noqa: BLE001 - an unreadable result must not take the report down
                verdict = not_run(spec.question, f"could not judge {path.name}: {type(error).__name__}: {error}")
        verdicts.append(replace(verdict, section=spec.key))
    return verdicts


def write_study_report(
    out: str | Path,
    *,
    sections: Sequence[SectionSpec],
    stages: Mapping[str, Mapping] | None = None,
    settings: Mapping | None = None,
    total_seconds: float | None = None,
    extra: Mapping[str, StageSection | Reportable] | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write ``out/report.html`` for a study folder (see :func:`study_sections`); returns its path.

    ``sections``: the report sections of the study's stages, in order
    (``surprise_probe.app.study.report_sections()`` for the default study).

    ``settings`` (model name, inputs, ...) and ``stages`` default to those in ``out/study.json``.
    """
    out = Path(out)
    record = read_json(out / "study.json") if (out / "study.json").exists() else {}
    settings = dict(settings if settings is not None else record.get("settings", {}))
    stages = stages if stages is not None else record.get("stages", {})
    if total_seconds is None and stages:
        total_seconds = sum(float(s.get("seconds") or 0) for s in stages.values())
    models = [str(settings[key]) + (" (base reader in the policy gap)" if key == "base_reader" else "")
              for key in ("model", "base_model", "reader", "base_reader") if settings.get(key)]
    header = ReportHeader(
        title=f"surprise-probe study: {', '.join(models) or out.name}",
        models=models or ["(not recorded)"],
        data=str(settings.get("input", "(not recorded)")),
        total_seconds=total_seconds,
        versions=record.get("software_versions") or software_versions(),
        notes=", ".join(f"{k} = {v}" for k, v in settings.items() if k not in ("model", "input") and not isinstance(v, (dict, list)))
    )
    return write_report_html(path or out / "report.html", header, study_sections(out, sections, stages, extra),
                             verdicts=study_verdicts(out, sections, stages))
