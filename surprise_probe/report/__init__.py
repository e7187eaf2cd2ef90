"""The study's one self-contained HTML report (above the analyses; below the app layer).

``write_study_report(out, sections=...)`` is what the study calls. The modules, by concept:

- :mod:`~surprise_probe.report.values`: what a report is made of (:class:`StageSection`,
  :class:`Number`, :class:`ReportHeader`, :class:`Reportable`) and the sections built in hand
  (:func:`result_section`, :func:`failed_section`);
- :mod:`~surprise_probe.report.probe_sections`, :mod:`~surprise_probe.report.intervention_sections`,
  :mod:`~surprise_probe.report.analysis_sections`: sections read from what each stage saved;
- :mod:`~surprise_probe.report.verdicts`: the study's questions, each answered from the saved
  results by a rule stated on the page (:class:`Verdict`, :data:`QUESTIONS`);
- :mod:`~surprise_probe.report.study_report`: a study folder as a report (:class:`SectionSpec`,
  :func:`study_sections`, :func:`study_verdicts`, :func:`write_study_report`);
- :mod:`~surprise_probe.report.html`: the page itself (:func:`write_report_html`).
"""

from surprise_probe.report.analysis_sections import (
    gap_section,
    intention_section,
    token_view_section,
)
from surprise_probe.report.html import write_report_html
from surprise_probe.report.intervention_sections import (
    attribution_section,
    compare_section,
    norm_section,
    patch_section,
    steer_section,
)
from surprise_probe.report.probe_sections import capture_section, fit_figure, fit_section
from surprise_probe.report.study_report import (
    SectionSpec,
    study_sections,
    study_verdicts,
    write_study_report,
)
from surprise_probe.report.values import (
    Number,
    Reportable,
    ReportHeader,
    StageSection,
    failed_section,
    result_section,
)
from surprise_probe.report.verdicts import QUESTIONS, Verdict

__all__ = [
    "Number",
    "StageSection",
    "ReportHeader",
    "Reportable",
    "write_report_html",
    "write_study_report",
    "study_sections",
    "failed_section",
    "result_section",
    "capture_section",
    "fit_section",
    "norm_section",
    "steer_section",
    "patch_section",
    "attribution_section",
    "token_view_section",
    "compare_section",
    "gap_section",
    "intention_section",
    "fit_figure",
    "SectionSpec",
    "study_verdicts",
    "Verdict",
    "QUESTIONS",
]
