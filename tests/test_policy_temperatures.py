"""The gap's temperature curve: own responses sampled again per temperature, off/on ratio with CIs."""

import json

import numpy as np
import pytest

from surprise_probe.analyses.policy.gap import check_temperatures, policy_gap
from surprise_probe.analyses.policy.plots import all_figures
from surprise_probe.analyses.policy.prompts import GapPrompt
from surprise_probe.app.cli import main
from tests.test_policy import PROMPTS, trained  # noqa: F401 - the seeded self-trained reader (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def curve(trained):  # noqa: F811 - the imported fixture
    model, other = trained
    prompts = [GapPrompt(p.id, p.prompt, "The cat sat on the mat." if i % 2 else None) for i, p in enumerate(PROMPTS)]
    return policy_gap({"trained": model, "untrained": other}, prompts, formats=["assistant"], max_new_tokens=10,
                      temperature=0.5, n_boot=200, progress=False, temperatures=[0.5, 2.0, 3.0])


def test_the_curve_has_one_row_per_reader_source_and_temperature(curve):
    rows = curve.temperature_curve
    assert rows == curve.summary["temperature_curve"]
    keys = {(r["reader"], r["source"], r["temperature"]) for r in rows}
    sources = {"trained": ["human", "own_other_prompt", "writer:untrained"],
               "untrained": ["human", "own_other_prompt", "writer:trained"]}
    assert keys == {(reader, s, t) for reader, ss in sources.items() for s in ss for t in (0.5, 2.0, 3.0)}
    for row in rows:
        low, high = row["ci"]
        assert low <= row["ratio"] <= high and row["n"] == (3 if row["source"] == "human" else len(PROMPTS))
        assert row["format"] == "assistant" and row["level"] == 0.95


def test_at_the_main_temperature_the_curve_is_the_main_comparison(curve):
    """T = the main temperature reuses the main samples: the same ratio, to the last bit."""
    for row in [r for r in curve.temperature_curve if r["temperature"] == 0.5]:
        main = curve.comparison(row["reader"], "assistant", row["source"])["span"]["ratio_off_on"]
        assert row["ratio"] == main["value"] and row["ci"] == [main["low"], main["high"]]
        own = curve.cell(row["reader"], "assistant", "own")["mean_entropy"]
        assert row["mean_entropy_own"]["mean"] == own["mean"]


def test_own_text_sampled_colder_reads_at_lower_entropy(curve):
    """By construction: a colder sample sits on the reader's modes, so the reader reads it with less
    uncertainty and the off/on ratio against the same off-policy text grows as T falls."""
    rows = [r for r in curve.temperature_curve if (r["reader"], r["source"]) == ("trained", "writer:untrained")]
    by_t = {r["temperature"]: r for r in rows}
    own = [by_t[t]["mean_entropy_own"]["mean"] for t in (0.5, 2.0, 3.0)]
    assert own[0] < own[1] < own[2]  # measured 0.45, 0.96, 2.73 nats
    assert by_t[0.5]["ratio"] > by_t[2.0]["ratio"] > by_t[3.0]["ratio"]  # measured 7.3, 3.4, 1.2
    # The untrained reader (near-uniform) has no gap at any temperature.
    control = [r for r in curve.temperature_curve if r["reader"] == "untrained"]
    assert all(0.98 < r["ratio"] < 1.02 for r in control)
    # The samples at T are new draws (kept beside the main ones) and their reads are own text only.
    assert set(curve.temperature_responses) == {0.5, 2.0, 3.0}
    assert curve.temperature_responses[0.5]["trained"] is curve.responses["trained"]
    assert {r.source for r in curve.temperature_readings[2.0]} == {"own", "own_other_prompt"}
    drawn = [r.content_ids for r in curve.temperature_responses[2.0]["trained"]]
    assert drawn != [r.content_ids for r in curve.responses["trained"]]


def test_the_curve_is_saved_plotted_and_reported(curve, tmp_path):
    paths = curve.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["config"]["temperatures"] == [0.5, 2.0, 3.0]
    assert len(saved["summary"]["temperature_curve"]) == len(curve.temperature_curve)
    assert {r["temperature"] for r in saved["temperature_per_response"]} == {0.5, 2.0, 3.0}
    figure = all_figures(curve)["temperature_curve"]
    assert {trace.name for trace in figure.data if trace.showlegend} >= {"human (the human-written answer to this prompt)"}
    assert "Off/on ratio vs sampling temperature" in paths["html"].read_text()
    assert "T=2     writer:untrained" in curve.report()
    assert "T=0.5 off/on trained (assistant)" in curve._repr_html_()


def test_no_temperatures_no_curve(trained):  # noqa: F811
    model, _ = trained
    result = policy_gap({"m": model}, PROMPTS[:2], formats=["assistant"], max_new_tokens=3, n_boot=20, progress=False)
    assert result.temperature_curve == [] and result.config["temperatures"] is None
    assert "temperature_curve" not in all_figures(result)


def test_a_reader_not_read_in_its_sampling_format_draws_its_curve_in_a_format_it_reads(trained):  # noqa: F811
    model, other = trained
    prompts = [GapPrompt(p.id, p.prompt, "The cat sat." if i % 2 else None) for i, p in enumerate(PROMPTS[:4])]
    result = policy_gap({"trained": model, "untrained": other}, prompts, formats=["plain"], max_new_tokens=4,
                        temperature=0.5, n_boot=20, progress=False, temperatures=[0.5, 1.0])
    assert result.models[0]["sampling_format"] == "assistant" and result.models[0]["curve_format"] == "plain"
    rows = result.temperature_curve
    assert {r["format"] for r in rows} == {"plain"}
    assert {(r["source"], r["temperature"]) for r in rows if r["reader"] == "trained"} == {
        (s, t) for s in ("human", "own_other_prompt", "writer:untrained") for t in (0.5, 1.0)}
    assert not any(r.exact_ids for r in result.temperature_readings[1.0])  # re-tokenized in plain


@pytest.mark.parametrize("bad", [[0.0], [-0.5], [float("nan")], [float("inf")], [0.7, 0.7]])
def test_bad_temperatures_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="temperatures: .*(expected positive finite numbers|listed twice)") as error:
        check_temperatures(bad)
    assert repr(bad[0]) in str(error.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["0"], "argument --temperatures: expected a finite number > 0, got '0'"),
        (["0.5", "-1"], "argument --temperatures: expected a finite number > 0, got '-1'"),
        (["nan"], "expected a finite number > 0, got 'nan'"),
        (["inf"], "expected a finite number > 0, got 'inf'"),
        (["hot"], "expected a finite number > 0, got 'hot'"),
        (["0.7", "0.7"], "temperatures: 0.7 is listed twice"),
    ],
)
def test_bad_temperatures_exit_2_before_any_model_loads(tmp_path, tiny_hf_folder, monkeypatch, capsys, values,
                                                        message):
    import surprise_probe.app.commands.gap as gap_command

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(gap_command, "load_model", no_loading)
    argv = ["gap", "--models", str(tiny_hf_folder), "--temperatures", *values, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surprise-probe gap: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gap_command_with_temperatures_end_to_end(tmp_path, tiny_hf_folder, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello world", "answer": "The cat sat."}\n{"prompt": "Rivers flow to the sea"}\n')
    out = tmp_path / "out"
    argv = ["gap", "--models", str(tiny_hf_folder), "--prompts", str(prompts), "--out", str(out), "--formats",
            "assistant", "--max-new-tokens", "4", "--n-boot", "50", "--no-progress", "--device", "cpu",
            "--temperatures", "0.5", "1.0"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "gap.json").read_text())
    curve = result["summary"]["temperature_curve"]
    assert {r["temperature"] for r in curve} == {0.5, 1.0} and all(np.isfinite(r["ratio"]) for r in curve)
    assert len(list((out / "responses").glob("*.T0.5.jsonl"))) == 1  # resumable like the main samples
    assert not list((out / "responses").glob("*.T1.jsonl"))  # T = --temperature reuses the main samples
    row = result["summary"]["comparisons"][0]
    assert row["auroc_binoculars"]["available"] is False and "one reader" in row["auroc_binoculars"]["reason"]
    text = capsys.readouterr().out
    assert "temperature curve" in text and "Binoculars for" in text
