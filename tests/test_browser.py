"""The study report in a real browser: headless Chromium driven through chromedriver.

Checks what a reader sees: no console errors, every plotly figure rendered (non-empty plot nodes),
the token view's layer menu recolours the text, every figure fits a 1300 px wide window (nothing
clipped), and a screenshot is written next to the report. Chromium is driven over the W3C
WebDriver HTTP protocol with the standard library (no selenium dependency). Without
``chromium`` and ``chromedriver`` (Debian packages ``chromium`` and ``chromium-driver``) the
test is skipped with a message saying so.

Set ``SP_BROWSER_OUT`` to keep the report and screenshot in a folder of your choice.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_report import build_tiny_study, tiny_study  # noqa: F401, F811 - fixture shared with test_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=("headless browser test SKIPPED: chromium and/or chromedriver not found on PATH "
            "(install the Debian packages `chromium` and `chromium-driver`; .ci/run does)"),
)

WIDTH, HEIGHT = 1300, 900


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP to a local chromedriver."""

    def __init__(self, user_data_dir: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.time() > deadline:
                    self.process.kill()
                    raise
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", f"--window-size={WIDTH},{HEIGHT}"]
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                        "goog:loggingPrefs": {"browser": "ALL"}}
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read().decode())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

    def console(self) -> list[dict]:
        return self._call("POST", f"{self.session}/se/log", {"type": "browser"})

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def report(tiny_study) -> Path:  # noqa: F811 - the shared fixture
    """The report.html the tiny study run wrote; with SP_BROWSER_OUT set, the study is run in (or
    reused from) that folder."""
    keep = os.environ.get("SP_BROWSER_OUT")
    out = tiny_study
    if keep:
        out = Path(keep)
        if not (out / "study.json").exists():
            build_tiny_study(out)
    assert (out / "report.html").exists(), "the study did not write report.html"
    return out / "report.html"


@pytest.fixture(scope="module")
def browser(report):
    with tempfile.TemporaryDirectory(prefix="sp-chromium-") as profile:
        driver = WebDriver(Path(profile))
        try:
            driver.get(report.resolve().as_uri())
            deadline = time.time() + 60
            while driver.run("return document.readyState") != "complete" and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # plotly draws after load
            yield driver
        finally:
            driver.close()


def test_no_console_errors(browser):
    errors = [entry for entry in browser.console() if entry.get("level") == "SEVERE"]
    assert not errors, f"console errors: {errors}"


def test_every_figure_is_rendered(browser, report):
    counts = browser.run("""
        const plots = Array.from(document.querySelectorAll('.plotly-graph-div'));
        return plots.map(p => ({id: p.id, svg: p.querySelectorAll('.main-svg').length,
                                marks: p.querySelectorAll('.trace, .point, .bars path, .hm image, .heatmaplayer image').length}));
    """)
    expected = report.read_text(encoding="utf-8").count("Plotly.newPlot")
    assert len(counts) == expected >= 6
    empty = [c for c in counts if c["svg"] == 0 or c["marks"] == 0]
    assert not empty, f"figures with no plot nodes: {empty}"


def test_figures_fit_1300px(browser):
    width = browser.run("return window.innerWidth")
    assert width <= WIDTH
    boxes = browser.run("""
        return Array.from(document.querySelectorAll('.plotly-graph-div, .sp-tv, table.sp-numbers')).map(el => {
            const r = el.getBoundingClientRect();
            const svg = el.querySelector('.main-svg');
            return {id: el.id || el.className, left: r.left, right: r.right, scroll: el.scrollWidth, client: el.clientWidth,
                    svg: svg ? svg.getBoundingClientRect().width : 0};
        });
    """)
    clipped = [b for b in boxes if b["left"] < 0 or b["right"] > width + 0.5 or b["svg"] > width + 0.5
               or b["scroll"] > b["client"] + 1]
    assert not clipped, f"clipped at {WIDTH} px: {clipped}"
    assert browser.run("return document.documentElement.scrollWidth") <= width
    titles = browser.run("""
        return Array.from(document.querySelectorAll('.plotly-graph-div')).map(p => {
            const t = p.querySelector('.gtitle'); const svg = p.querySelector('.main-svg');
            if (!t) return null; const a = t.getBoundingClientRect(), b = svg.getBoundingClientRect();
            return {left: a.left - b.left, right: b.right - a.right};
        }).filter(x => x);
    """)
    assert titles and all(t["left"] >= -1 and t["right"] >= -1 for t in titles), titles


def test_layer_menu_recolours_the_token_view(browser):
    state = browser.run("""
        const root = document.querySelector('.sp-tv');
        const q = root.querySelector('select.quantity'), l = root.querySelector('select.layer');
        const colours = () => Array.from(root.querySelectorAll('.tok')).map(s => s.style.background);
        q.value = 'attribution'; q.dispatchEvent(new Event('change'));
        const layers = Array.from(l.options).map(o => o.value);
        const seen = layers.map(v => { l.value = v; l.dispatchEvent(new Event('change')); return colours().join('|'); });
        const tokens = root.querySelectorAll('.tok').length;
        const unreadable = Array.from(root.querySelectorAll('.tok')).filter(s => {
            const bg = getComputedStyle(s).backgroundColor.match(/\\d+/g).map(Number);
            const fg = getComputedStyle(s).color.match(/\\d+/g).map(Number);
            const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
                               return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
            const [a, b] = [lum(bg), lum(fg)].sort((x, y) => y - x);
            return (a + 0.05) / (b + 0.05) < 4.5;
        }).length;
        return {layers: layers.length, distinct: new Set(seen).size, tokens, unreadable,
                scored: root.querySelectorAll('.tok.scored').length, positions: root.querySelectorAll('.pos').length};
    """)
    assert state["tokens"] > 10 and state["layers"] == 3
    assert state["distinct"] == state["layers"], state  # every layer paints differently
    assert state["unreadable"] == 0, state  # WCAG AA contrast for every token
    assert 0 < state["scored"] < state["tokens"] and state["positions"] >= 2


def test_hover_shows_values_and_top5(browser):
    text = browser.run("""
        const tok = document.querySelectorAll('.sp-tv .tok')[5];
        const r = tok.getBoundingClientRect();
        tok.dispatchEvent(new MouseEvent('mouseenter', {clientX: r.left + 2, clientY: r.top + 2}));
        const tip = document.querySelector('.sp-tv .tip');
        const out = tip.style.display + '|' + tip.innerText;
        tok.dispatchEvent(new MouseEvent('mouseleave'));
        return out;
    """)
    assert text.startswith("block|")
    for label in ("position 5", "input surprise", "output entropy", "decoded surprise", "steering", "attribution",
                  "top-5 next tokens"):
        assert label in text, label


def test_screenshot_is_written(browser, report):
    browser.run("document.querySelector('#stage-token_view').scrollIntoView();")
    time.sleep(0.3)
    token_view = browser.screenshot(report.parent / "report_token_view.png")
    browser.run("window.scrollTo(0, 0);")
    time.sleep(0.3)
    top = browser.screenshot(report.parent / "report_screenshot.png")
    for shot in (top, token_view):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


STANDALONE = ["fit_surprise/sweep.html", "fit_surprise/alphas.html", "steer/dose_response.html", "steer/ablation.html",
              "compare/direction_comparison.html", "patch/patching.html", "attribution/attribution.html",
              "attribution/token_view.html", "gap/gap.html", "intention/intention_commitment.html",
              "intention/intention_readout.html", "intention/intention_prefill.html", "intention/intention_topics.html"]


def test_standalone_figures_fit_1300px(browser, report):
    """Each stage's own HTML file (written by plots.write_html) also reads at 1300 px (issue #16.6).
    Runs last: it navigates away from the report."""
    clipped, fixed_width = [], []
    for name in STANDALONE:
        path = report.parent / name
        assert path.exists(), f"the study did not write {name}"
        browser.get(path.resolve().as_uri())
        time.sleep(0.5)
        state = browser.run("""
            const width = window.innerWidth;
            const svgs = Array.from(document.querySelectorAll('.main-svg')).map(s => s.getBoundingClientRect().right);
            const plot = document.querySelector('.plotly-graph-div');
            const fixed = plot && plot.layout && plot.layout.width ? plot.layout.width : null;
            // titles, subplot titles, annotations and legends: inside the window, left and right
            const texts = Array.from(document.querySelectorAll('.gtitle, .annotation-text, .legend'))
                .map(t => t.getBoundingClientRect()).filter(r => r.width > 0);
            return {width, page: document.documentElement.scrollWidth, right: Math.max(0, ...svgs), fixed,
                    text_right: Math.max(0, ...texts.map(r => r.right)), text_left: Math.min(0, ...texts.map(r => r.left))};
        """)
        if (state["page"] > state["width"] or state["right"] > state["width"] + 0.5
                or state["text_right"] > state["width"] + 0.5 or state["text_left"] < -0.5):
            (fixed_width if state["fixed"] and state["fixed"] > WIDTH else clipped).append((name, state))
    assert not clipped, f"clipped at {WIDTH} px: {clipped}"
    assert not fixed_width, f"figures with a fixed width above {WIDTH} px: {[(n, s['fixed']) for n, s in fixed_width]}"
