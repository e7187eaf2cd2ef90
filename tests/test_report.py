"""The study report: one self-contained page built from a tiny model's study folder."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from html import escape
from pathlib import Path

import pytest
import torch

from surprise_probe.app.study import report_sections
from surprise_probe.core.utils.jsonio import read_json, write_json
from surprise_probe.report import (
    Number,
    ReportHeader,
    StageSection,
    failed_section,
    fit_figure,
    result_section,
    study_sections,
    write_report_html,
    write_study_report,
)
from surprise_probe.testing import TINY_CORPUS


def _conv(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


ITEMS = [_conv(TINY_CORPUS[i % 6], TINY_CORPUS[(5 * i + 1) % 6]) for i in range(12)]
PAIRS = [(_conv(TINY_CORPUS[i], TINY_CORPUS[(i + 1) % 6]), _conv(TINY_CORPUS[i], TINY_CORPUS[(i + 3) % 6]))
         for i in range(4)]


TINY_SETTINGS = {"model": "tiny-random-3l", "input": "12 tiny conversations", "n_boot": 50, "steer_inputs": 3,
                 "random_directions": 2, "strengths": [-2.0, 0.0, 2.0], "patch_pairs": 4, "patch_layers": 3,
                 "sample_tokens": 12, "token_view_tokens": 64, "gap_prompts": 4, "gap_temperatures": [0.5, 1.0],
                 "norm_inputs": 3, "norm_neurons": 2, "norm_random_neurons": 1,
                 "intention_prompts": 2,
                 "intention_samples": 3, "intention_tokens": 8, "intention_ks": [0, 1, 4]}


def build_tiny_study(out: Path) -> Path:
    """The whole study (every default stage, report included) on a random 3-layer model (about 15 s)."""
    from surprise_probe.app.study import run_study
    from surprise_probe.testing import tiny_model

    warnings.simplefilter("ignore")
    model = tiny_model(n_layers=3, n_ctx=256, seed=5)
    result = run_study(model, ITEMS, out, progress=False, settings=dict(TINY_SETTINGS))
    assert result.ok, result.stages
    return out


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, one_thread) -> Path:
    """Built once per test session (tests/test_browser.py uses it too)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = build_tiny_study(tmp_path_factory.mktemp("study"))
    return _BUILT[key]


def test_report_is_one_self_contained_page(tiny_study):
    path = write_study_report(tiny_study, sections=report_sections())
    html = path.read_text(encoding="utf-8")
    assert path == tiny_study / "report.html"
    assert html.count("Plotly.newPlot") >= 6  # capture, 2 sweeps, dose-response, ablation, patching, scatter
    assert len(re.findall(r"<script[^>]*>\s*/\*\*\s*\n?\s*\* plotly\.js", html)) <= 1
    assert html.count("plotly.js v") <= 2 and "<script src=" not in html  # inlined once, nothing fetched
    assert path.stat().st_size < 10_000_000
    for stage in ("capture", "fit_surprise", "fit_entropy", "steer", "norm", "compare", "patch", "attribution", "token_view",
                  "gap", "intention"):
        assert f"id='stage-{stage}'" in html, stage
    assert "11 of 11 ok" in html and "Key numbers" in html
    # every stage's JSON is linked relative to the report
    for link in ("capture/capture_summary.json", "fit_surprise/sweep.json", "steer/steer.json",
                 "compare/direction_comparison.json", "patch/patch.json", "attribution/attribution.json",
                 "attribution/token_view.json", "gap/gap.json", "intention/intention.json"):
        assert f"href='{link}'" in html, link
        assert (tiny_study / link).exists()
    assert "tiny-random-3l" in html and "12 tiny conversations" in html


def test_numbers_carry_ci_control_and_sample(tiny_study):
    sections = {s.key: s for s in study_sections(tiny_study, report_sections())}
    sweep = read_json(tiny_study / "fit_surprise" / "sweep.json")
    best = next(row for row in sweep["hooks"] if row["hook"] == sweep["best_hook"])
    first = sections["fit_surprise"].numbers[0]
    assert first.value == best["r2"]["value"] and first.ci == (best["r2"]["low"], best["r2"]["high"])
    assert "shuffled labels" in first.control and str(sweep["n_tokens"]) in first.n
    steer = read_json(tiny_study / "steer" / "steer.json")["dose_response"]
    slope = sections["steer"].numbers[0]
    assert slope.value == steer["probe_slope"] and "random directions" in slope.control
    assert f"{steer['n_sequences']} sequences" in slope.n
    attribution = read_json(tiny_study / "attribution" / "attribution.json")
    assert sections["attribution"].numbers[0].value == attribution["pearson_r"]
    compare = read_json(tiny_study / "compare" / "direction_comparison.json")
    assert [n.value for n in sections["compare"].numbers] == [row["entropy_slope"] for row in compare["summary"]]
    assert all("random directions" in n.control for n in sections["compare"].numbers)
    gap = read_json(tiny_study / "gap" / "gap.json")
    row = next(r for r in gap["summary"]["comparisons"] if r["format"] == "assistant" and r["source"] == "human")
    number = next(n for n in sections["gap"].numbers if "reading human" in n.measure)
    assert number.value == row["span"]["ratio_off_on"]["value"] and "AUROC" in number.control
    assert number.n == f"{row['span']['n_prompts']} prompts"
    intention = read_json(tiny_study / "intention" / "intention.json")["models"][0]
    assert sections["intention"].numbers[0].value == intention["topic_entropy"]["value"]
    assert "uniform" in sections["intention"].numbers[0].control


def test_a_stage_recorded_done_without_results_is_named(tmp_path):
    write_json(tmp_path / "study.json", {"settings": {"model": "m"}, "stages": {
        "capture": {"status": "done", "seconds": 1}, "steer": {"status": "skipped", "error": "needs fit_surprise"}}})
    sections = {s.key: s for s in study_sections(tmp_path, report_sections())}
    assert sections["capture"].status == "missing" and "has no results" in sections["capture"].error
    assert sections["steer"].status == "skipped" and sections["steer"].error == "needs fit_surprise"
    html = write_study_report(tmp_path, sections=report_sections()).read_text(encoding="utf-8")
    assert "0 of 2 ok" in html


def test_hook_sections_for_analyses_without_an_adapter(tmp_path):
    import plotly.graph_objects as go

    class GapLike:
        def report_section(self, json_path=None):
            return result_section("gap", "Policy gap", caption="line one<br>line two",
                                  figures=[go.Figure(go.Bar(y=[1, 2]))],
                                  numbers=[Number("off/on entropy ratio", 1.7, (1.4, 2.1), control="base model 1.02",
                                                  n="32 prompts")])

    write_json(tmp_path / "study.json", {"settings": {"model": "m"}, "stages": {"gap": {"status": "done", "seconds": 3}}})
    html = write_study_report(tmp_path, sections=report_sections(), extra={"gap": GapLike()}).read_text(encoding="utf-8")
    assert "off/on entropy ratio" in html and "[1.400, 2.100]" in html and "base model 1.02" in html
    assert "1 of 1 ok" in html


def test_report_html_escapes_and_shows_errors(tmp_path):
    header = ReportHeader("t <x>", models=["a"], data="d", total_seconds=65.0, versions={"torch": "2"})
    sections = [failed_section("s", "Stage <s>", "ValueError: bad <value>"),
                StageSection("ok", "Fine", numbers=[Number("m", float("nan"))])]
    html = write_report_html(tmp_path / "r.html", header, sections).read_text(encoding="utf-8")
    assert "bad &lt;value&gt;" in html and "Stage &lt;s&gt;" in html
    assert "65 s (1.1 min)" in html and "<td>n/a</td>" in html


def test_wide_figures_are_made_to_fit(tmp_path):
    import plotly.graph_objects as go

    wide = go.Figure(go.Scatter(y=[1, 2]))
    wide.update_layout(width=1400, title="a very long title " * 12)
    html = write_report_html(tmp_path / "r.html", ReportHeader("t", ["m"], "d"),
                             [StageSection("x", "X", figures=[wide])]).read_text(encoding="utf-8")
    assert '"width":1400' not in html.replace(" ", "")
    assert "\\u003cbr\\u003e" in re.search(r'"title":\{"text":"([^"]*)"', html).group(1)  # <br>, JSON-escaped
    assert wide.layout.width == 1400  # the caller's figure is not modified


def test_token_view_data_and_html(tiny_study):
    data = read_json(tiny_study / "attribution" / "token_view.json")
    n = len(data["tokens"])
    assert data["input_surprise"][0] is None and all(v is not None for v in data["output_entropy"])
    assert set(data["attribution"]) == set(data["hooks"]) and all(len(v) == n for v in data["attribution"].values())
    assert all(len(top) == 5 for top in data["top_next"])
    probs = [p for _, p in data["top_next"][3]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert any(data["scored"]) and not all(data["scored"])
    assert len(data["steer_plus"]) == n and any(abs(v) > 0 for v in data["steer_plus"])


def test_token_view_steering_matches_an_independent_hook(tiny_hooked, one_thread):
    """The +/- strength entropy change equals adding strength * std * d by hand."""
    from surprise_probe.interventions import SteeringDirection

    from surprise_probe.analyses.token_view import token_view_data
    from surprise_probe.core.forward.metrics import output_entropy

    d = torch.zeros(64)
    d[3] = 1.0
    direction = SteeringDirection(d, "blocks.0.hook_resid_post", std=0.5)
    data = token_view_data(tiny_hooked, "The quick brown fox jumps.", direction, strength=3.0, attribution=False)
    tokens = tiny_hooked.to_tokens("The quick brown fox jumps.")
    assert tokens.shape[1] == len(data.tokens)

    def add(sign):
        def hook(activation, hook):
            return activation + sign * 3.0 * 0.5 * d
        return hook

    with torch.no_grad():
        clean = output_entropy(tiny_hooked(tokens, return_type="logits"))[0]
        with tiny_hooked.hooks(fwd_hooks=[("blocks.0.hook_resid_post", add(1))]):
            plus = output_entropy(tiny_hooked(tokens, return_type="logits"))[0]
    assert data.steer_plus == pytest.approx((plus - clean).tolist(), abs=2e-5)
    assert data.attribution == {}


def test_token_view_refuses_bad_values(tiny_hooked):
    from surprise_probe.interventions import SteeringDirection

    from surprise_probe.analyses.token_view import token_view_data, token_view_html

    direction = SteeringDirection(torch.ones(64), "blocks.0.hook_resid_post", std=1.0)
    with pytest.raises(ValueError, match="strength must be a positive finite number"):
        token_view_data(tiny_hooked, "Hi there.", direction, strength=-1)
    data = token_view_data(tiny_hooked, "Hi there.", direction, attribution=False)
    with pytest.raises(ValueError, match="element_id must be letters"):
        token_view_html(data, element_id="x'><script>")


def _colour(trace):
    return (trace.line.color if trace.line is not None and trace.line.color else None) or trace.fillcolor


def test_dose_response_fits_the_page_and_random_directions_share_one_neutral_colour(tiny_study):
    """#16.6: no fixed width (a 1400 px figure was clipped at 1300 px), random directions in one
    grey distinct from the orthogonal control, no stray markers on the bands."""
    from surprise_probe.interventions.plots import ablation_figure, dose_response_figure

    steer = read_json(tiny_study / "steer" / "steer.json")
    fig = dose_response_figure(steer["dose_response"])
    assert fig.layout.width is None and "<br>" in fig.layout.title.text
    random = [t for t in fig.data if t.legendgroup in ("random", "randmean")]
    orthogonal = [t for t in fig.data if t.legendgroup == "ortho"]
    assert random and orthogonal
    assert {t.line.color for t in random if t.mode == "lines" and t.fill is None} == {"#7f7f7f"}
    assert all(t.mode == "lines" for t in fig.data if t.fill == "toself")  # bands draw no markers
    assert {t.line.color for t in orthogonal} == {"#1f77b4"}
    bars = ablation_figure(steer["ablation"]).data[0]
    colours = dict(zip(bars.x, bars.marker.color, strict=True))
    assert {colours[k] for k in colours if k.startswith("random")} == {"#7f7f7f"}
    assert colours["orthogonal"] == "#1f77b4" != colours["probe"]


def test_patching_heatmap_prints_the_ci_and_labels_layers_once(tiny_study):
    from surprise_probe.interventions.plots import patching_figure

    patch = read_json(tiny_study / "patch" / "patch.json")["patching"]
    fig = patching_figure(patch)
    first = fig.data[0]
    value, (low, high) = patch["fraction"]["direction"][0][0], patch["fraction_ci"]["direction"][0][0]
    assert first.text[0][0] == f"{value:.2f}<br>[{low:.2f}, {high:.2f}]"  # the CI in the cell, not only on hover
    assert list(first.y) == [f"L{h.split('.')[1]} resid_post" for h in patch["hooks"]]
    assert all(getattr(fig.layout, f"yaxis{i}").matches == "y" for i in range(2, len(fig.data) + 1))
    assert fig.layout.width is None


def test_sweep_controls_have_distinct_colours_and_matching_dashes(tiny_study):
    """Token identity (purple, long dash) and shuffled labels (grey, dash): bands and lines apart."""
    fig = fit_figure(read_json(tiny_study / "fit_surprise" / "sweep.json"))
    traces = {t.name: t for t in fig.data if t.name}
    token, shuffle = traces["token-type mean (token identity)"], traces["shuffled labels (mean)"]
    assert token.line.color != shuffle.line.color and (token.line.dash, shuffle.line.dash) == ("longdash", "dash")
    token_band = next(t for t in fig.data if t.legendgroup == "token" and t.fill == "toself")
    shuffle_band = next(t for t in fig.data if t.legendgroup == "shuffle" and t.fill == "toself")
    assert token_band.fillcolor != shuffle_band.fillcolor
    assert traces["embedding-layer probe"].marker.color == token.line.color


# --- issue 23: the verdicts and the report's defects ---------------------------------------------------

def _figures(study):
    return [(s.key, fig) for s in study_sections(study, report_sections()) for fig in s.figures]


def test_report_opens_with_verdicts_computed_by_the_rules(tiny_study):
    from surprise_probe.report import study_verdicts
    from surprise_probe.report.verdicts import QUESTIONS

    verdicts = study_verdicts(tiny_study, report_sections())
    assert [v.key for v in verdicts] == ["decodable", "causal", "direct", "patching", "gap", "intention"]
    files = {"decodable": "fit_surprise/sweep.json", "causal": "steer/steer.json", "direct": "norm/norm_control.json",
             "patching": "patch/patch.json", "gap": "gap/gap.json", "intention": "intention/intention.json"}
    for verdict in verdicts:  # each answer is its rule applied to what the stage saved
        judged = QUESTIONS[verdict.key].judge(read_json(tiny_study / files[verdict.key]))
        assert replace(judged, section=verdict.section) == verdict
    html = write_study_report(tiny_study, sections=report_sections()).read_text(encoding="utf-8")
    body = html[html.index("<body"):]
    assert body.index("id='verdicts'") < body.index("class='sp-header'") < body.index("id='stage-capture'")
    for verdict in verdicts:
        assert escape(verdict.rule) in html and escape(verdict.numbers) in html
        assert f"href='#stage-{verdict.section}'>{escape(verdict.question)}" in html
    # the tiny study runs 2 random directions over 3 sequences: too small to test causality
    assert next(v for v in verdicts if v.key == "causal").answer == "not tested at this size"
    assert next(v for v in verdicts if v.key == "direct").answer == "not tested at this size"  # 3 sequences


def test_a_failed_stage_answers_not_run(tmp_path):
    from surprise_probe.report import study_verdicts

    write_json(tmp_path / "study.json", {"settings": {"model": "m"}, "stages": {
        "steer": {"status": "failed", "error": "RuntimeError: boom"}}})
    verdicts = {v.key: v for v in study_verdicts(tmp_path, report_sections())}
    assert verdicts["causal"].answer == "not run" and "boom" in verdicts["causal"].numbers
    assert verdicts["gap"].answer == "not run" and "does not exist" in verdicts["gap"].numbers


def test_study_random_directions_pass_the_toolkits_warning_or_say_so(tiny_study):
    from surprise_probe.app.study import DEFAULT_SETTINGS
    from surprise_probe.core.utils.stats import (
        MIN_RANDOM_DIRECTIONS,
        MIN_UNITS,
        small_sample_warnings,
    )

    assert DEFAULT_SETTINGS["random_directions"] >= MIN_RANDOM_DIRECTIONS
    assert small_sample_warnings(random_directions=DEFAULT_SETTINGS["random_directions"],
                                 units=DEFAULT_SETTINGS["steer_inputs"]) == []
    assert DEFAULT_SETTINGS["steer_inputs"] >= MIN_UNITS
    # where fewer are used (the tiny study: 2), the caveat sits beside the number
    sections = {s.key: s for s in study_sections(tiny_study, report_sections())}
    for key in ("steer", "compare", "patch"):
        assert all("caveat: z from 2 random directions" in n.control for n in sections[key].numbers), key


def test_whole_activation_patch_is_a_control_not_a_key_number(tiny_study):
    section = next(s for s in study_sections(tiny_study, report_sections()) if s.key == "patch")
    patch = read_json(tiny_study / "patch" / "patch.json")["patching"]
    assert patch["fraction"]["all"][0][0] == 1.0  # the response group: 1 by construction
    assert all("whole activation" not in n.measure for n in section.numbers)
    assert "component along d" in section.numbers[0].measure and "probe's layer" in section.numbers[0].measure
    assert "by construction" in section.numbers[0].control


def test_probe_section_lists_bigram_and_position_baselines(tiny_study):
    section = next(s for s in study_sections(tiny_study, report_sections()) if s.key == "fit_surprise")
    controls = read_json(tiny_study / "fit_surprise" / "sweep.json")["controls"]
    measures = {n.measure: n for n in section.numbers}
    assert measures["control: bigram mean R²"].value == controls["bigram_r2"]["value"]
    assert measures["control: position R²"].value == controls["position_r2"]["value"]
    assert any("minus its bigram mean" in m for m in measures) and any("minus its position" in m for m in measures)
    first = section.numbers[0].control
    assert "bigram mean" in first and "position" in first and "token-type mean" in first
    names = {t.name for t in section.figures[0].data}
    assert {"bigram mean (previous + current token) baseline", "position in the sequence baseline"} <= names


def test_token_view_does_not_show_the_attribution_stages_time(tiny_study):
    sections = {s.key: s for s in study_sections(tiny_study, report_sections())}
    assert sections["attribution"].seconds is not None
    assert sections["token_view"].seconds is None and "attribution" in sections["token_view"].time_note
    html = write_study_report(tiny_study, sections=report_sections()).read_text(encoding="utf-8")
    block = html[html.index("id='stage-token_view'"):]
    assert "time: included in the attribution stage" in block[:block.index("</section>")]


def test_every_figure_uses_the_white_template_and_lists_each_legend_entry_once(tiny_study):
    from collections import Counter

    figures = _figures(tiny_study)
    assert {key for key, _ in figures} >= {"gap", "intention", "compare", "steer"}
    for key, fig in figures:
        assert fig.layout.template.layout.plot_bgcolor == "white", (key, fig.layout.title.text)
        shown = Counter(t.name for t in fig.data if t.name and t.showlegend is not False)
        assert [name for name, count in shown.items() if count > 1] == [], (key, fig.layout.title.text)


def test_every_source_label_is_explained_where_it_appears(tiny_study):
    from surprise_probe.analyses.policy.plots import describe_source

    section = next(s for s in study_sections(tiny_study, report_sections()) if s.key == "gap")
    sources = {r["source"] for r in read_json(tiny_study / "gap" / "gap.json")["summary"]["comparisons"]}
    assert "own_other_prompt" in sources
    for source in sources:
        assert describe_source(source) != source
        assert f"<code>{source}</code>: " in section.caption
        for number in section.numbers:
            if f"reading {source} " in number.measure:
                assert f"reading {describe_source(source)}" in number.measure
        for fig in section.figures:
            for trace in fig.data:
                if trace.name and trace.name.split(" (")[0] == source:
                    assert trace.name == describe_source(source)
    assert any(f"reading {describe_source('own_other_prompt')}" in n.measure for n in section.numbers)


def test_gap_section_shows_the_detectors_and_the_temperature_curve(tiny_study):
    section = next(s for s in study_sections(tiny_study, report_sections()) if s.key == "gap")
    gap = read_json(tiny_study / "gap" / "gap.json")
    curve = gap["summary"]["temperature_curve"]
    assert sorted({point["temperature"] for point in curve}) == [0.5, 1.0]
    titles = [fig.layout.title.text or "" for fig in section.figures]
    assert any("temperature" in t.lower() for t in titles) and any("AUROC" in t for t in titles), titles
    shown = {round(n.value, 12) for n in section.numbers if "sampled at temperature" in n.measure}
    assert {round(p["ratio"], 12) for p in curve if p["ratio"] is not None} == shown
    # beside each comparison: the entropy AUROC against the best other detector, by the stated rule
    compared = [n.control for n in section.numbers if "mean entropy off / on" in n.measure]
    assert compared and all(re.search(r"entropy AUROC .* (better than|worse than|not distinguishable from) ", c)
                            for c in compared), compared


def test_reader_writer_heatmap_labels_rows_once_on_one_colour_scale(tiny_study):
    from surprise_probe.analyses.policy.plots import reader_writer_heatmap
    from surprise_probe.report.analysis_sections import _SavedGap

    fig = reader_writer_heatmap(_SavedGap(read_json(tiny_study / "gap" / "gap.json")))
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3  # one panel per format, 1 reader x 2 writers each
    assert {t.coloraxis for t in heatmaps} == {"coloraxis"}  # one colour bar that holds for every panel
    values = [v for t in heatmaps for row in t.z for v in row if v is not None]
    assert fig.layout.coloraxis.cmin == min(values) and fig.layout.coloraxis.cmax == max(values)
    for i in range(2, len(heatmaps) + 1):  # rows labelled once, on the left: no labels between panels
        axis = getattr(fig.layout, f"yaxis{i}")
        assert axis.matches == "y" and axis.showticklabels is False
    assert "diagonal" not in fig.layout.title.text and "on-policy" in fig.layout.title.text
    on_policy = [cell for t in heatmaps for row in t.text for cell in row if cell.startswith("<b>on-policy</b>")]
    assert len(on_policy) == len(heatmaps)


def test_intention_section_reconciles_entropy_with_unnamed_samples(tiny_study):
    from surprise_probe.analyses.intention.plots import readout_figure

    section = next(s for s in study_sections(tiny_study, report_sections()) if s.key == "intention")
    data = read_json(tiny_study / "intention" / "intention.json")
    assert data["models"][0]["bucket_shares"]["other"] > 0.5
    entropy = section.numbers[0]
    assert "name no lexicon topic" in entropy.control and "not that one topic was chosen" in entropy.control
    probe = next(n for n in section.numbers if "topic probe" in n.measure)
    assert probe.value == "not fitted" and "modal topic(s)" not in probe.control
    assert probe.control.startswith("it learns topics that are the most-named topic of at least 2 prompt groups")
    note = next(a.text for a in readout_figure(data).layout.annotations if "not fitted" in a.text)
    assert note.replace("<br>", " ").endswith(probe.control) and "<br>" in note  # whole, wrapped, not clipped
