"""The report's layout at 1300 px in headless Chromium (issue 23): the verdicts open the page and
fit it, and no heatmap's row labels run into a neighbouring panel's cells. Skipped, saying why,
without chromium and chromedriver (as tests/test_browser.py, whose driver and fixtures it uses)."""

from __future__ import annotations

import time

import pytest

from surprise_probe.report import ReportHeader, gap_section, write_report_html
from tests.test_browser import CHROMEDRIVER, CHROMIUM, WIDTH, browser, report  # noqa: F401 - shared fixtures
from tests.test_report import build_tiny_study, tiny_study  # noqa: F401 - fixture shared with test_report

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=("headless browser test SKIPPED: chromium and/or chromedriver not found on PATH "
            "(install the Debian packages `chromium` and `chromium-driver`)"),
)


def _overlap(a: list[float], b: list[float]) -> bool:
    """Do two boxes (left, right, top, bottom) share more than a pixel of area?"""
    return min(a[1], b[1]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[2], b[2]) > 1


def test_verdicts_open_the_page_and_fit_it(browser):  # noqa: F811 - the shared fixture
    layout = browser.run("""
        const v = document.getElementById('verdicts'), h1 = document.querySelector('h1');
        const t = v.querySelector('table.sp-verdicts'), r = t.getBoundingClientRect();
        return {next: h1.nextElementSibling && h1.nextElementSibling.id, top: v.getBoundingClientRect().top,
                header: document.querySelector('.sp-header').getBoundingClientRect().top,
                right: r.right, scroll: t.scrollWidth, client: t.clientWidth,
                rows: t.querySelectorAll('tr').length, answers: t.querySelectorAll('.sp-answer').length};
    """)
    assert layout["top"] < layout["header"] and layout["rows"] == 7 and layout["answers"] == 6, layout
    assert layout["right"] <= WIDTH and layout["scroll"] <= layout["client"] + 1, layout


def test_heatmap_row_labels_stay_clear_of_every_panel(browser, tiny_study, tmp_path):  # noqa: F811 - shared fixtures
    """The Quickstart's reader is ``smollm2-135m-instruct``: with labels that long on every panel they
    ran into the neighbouring panel's cells; the tiny model's short name would hide that."""
    gap = (tiny_study / "gap" / "gap.json").read_text(encoding="utf-8").replace("tiny-random-3l",
                                                                                 "smollm2-135m-instruct")
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "gap.json").write_text(gap, encoding="utf-8")
    page = write_report_html(tmp_path / "gap.html", ReportHeader("gap", ["m"], "d"), [gap_section(tmp_path / "gap")])
    browser.get(page.resolve().as_uri())
    time.sleep(1.5)  # plotly draws after load
    figures = browser.run("""
        const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; };
        return Array.from(document.querySelectorAll('.plotly-graph-div')).map(p => ({
            title: (p.querySelector('.gtitle') || {}).textContent || '',
            cells: Array.from(p.querySelectorAll('.hm image')).map(box),
            labels: Array.from(p.querySelectorAll('.yaxislayer-above text')).filter(t => t.textContent).map(box),
        })).filter(f => f.cells.length);
    """)
    assert any("rows read, columns wrote" in f["title"] for f in figures), [f["title"] for f in figures]
    for figure in figures:
        assert figure["labels"], figure["title"]
        clashes = [(label, cell) for label in figure["labels"] for cell in figure["cells"] if _overlap(label, cell)]
        assert not clashes, (figure["title"], clashes)
