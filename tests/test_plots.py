import numpy as np

import surprise_probe as sp
from surprise_probe.plots import entropy_by_position, token_view, write_html, write_report


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
