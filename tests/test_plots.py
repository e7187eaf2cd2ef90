import numpy as np
import pytest

import surprise_probe as sp
from surprise_probe.core.utils.plots import (
    entropy_by_position,
    token_view,
    write_html,
    write_report,
)


def test_token_view_carries_every_metric(tiny_hooked, tmp_path):
    m = sp.token_metrics(tiny_hooked, "The quick brown fox jumps over the lazy dog.")
    fig = token_view(m.tokens, m.input_surprise, m.output_entropy, m.scored,
                     extra={"probe prediction": np.arange(len(m.tokens), dtype=float)})
    assert len(fig.data) == 2
    hover = fig.data[0].hovertext
    assert len(hover) == len(m.tokens) and "probe prediction 3.000" in hover[3]
    np.testing.assert_allclose(fig.data[1].marker.color, m.output_entropy)
    path = write_html(fig, tmp_path / "t.html")
    assert "plotly" in path.read_text()[:5000].lower() and path.stat().st_size > 1_000_000  # plotly.js inlined


def test_entropy_by_position_means(tmp_path):
    positions = np.array([0, 1, 0, 1])
    values = np.array([1.0, 2.0, 3.0, 5.0])
    fig = entropy_by_position(positions, values, {"a": np.array([True, True, False, False]),
                                                   "b": np.array([False, False, True, True])})
    assert list(fig.data[0].y) == [1.0, 2.0] and list(fig.data[1].y) == [3.0, 5.0]
    report = write_report([("x", fig)], tmp_path / "r.html", "title")
    assert report.read_text().count("<h2>") == 1


def test_report_inlines_plotly_js_once_and_is_deterministic(tmp_path):
    from plotly.offline import get_plotlyjs

    figures = [(f"figure {i}", entropy_by_position(np.arange(3), np.ones(3), {"a": np.ones(3, bool)}))
               for i in range(4)]
    sections = [*figures, ("table <raw>", "<table><tr><td>1</td></tr></table>")]
    first = write_report(sections, tmp_path / "a.html", "A & B").read_bytes()
    second = write_report(sections, tmp_path / "b.html", "A & B").read_bytes()
    assert first == second  # fixed element ids: a rerun writes the same file
    text = first.decode()
    plotly_js = get_plotlyjs()
    assert text.count(plotly_js[-2000:]) == 1  # the library once, not once per figure
    assert len(plotly_js) < len(text) < len(plotly_js) + 200_000
    assert text.count("Plotly.newPlot") == 4 and "<h2>table &lt;raw&gt;</h2>" in text
    assert "<title>A &amp; B</title>" in text and "<td>1</td>" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html"]  # no temp files left
    single = write_html(figures[0][1], tmp_path / "one.html").read_text()
    assert single.count(plotly_js[-2000:]) == 1 and "<script src=" not in single


def test_report_refuses_content_that_is_not_a_figure_or_html(tmp_path, unchecked_shapes):
    with pytest.raises(TypeError, match="section 'x': content must be a plotly Figure"):
        write_report([("x", 3)], tmp_path / "r.html", "t")
    assert not (tmp_path / "r.html").exists()
