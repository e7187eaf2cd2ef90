"""The study's one self-contained HTML report (above the analyses; below the app layer).

``write_study_report(out, sections=...)`` is what the study calls; the sections and the page writer are in
:mod:`surprise_probe.report.html`.
"""

from surprise_probe.report.html import (
    Number,
    ReportHeader,
    SectionSpec,
    StageSection,
    failed_section,
    result_section,
    study_sections,
    write_report_html,
    write_study_report,
)

__all__ = ["write_study_report", "write_report_html", "study_sections", "result_section", "failed_section",
           "StageSection", "ReportHeader", "Number", "SectionSpec"]
