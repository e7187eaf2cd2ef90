"""Results in a notebook: short reprs, small HTML tables, tables that display, quiet progress bars,
figures that show offline; and the tutorial (docs/tutorial.ipynb), committed without outputs and
run end to end in a Jupyter kernel on the embedded model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from surprise_probe.interventions.attribution import validate_attribution
from surprise_probe.interventions.direction_comparison import compare_directions
from surprise_probe.interventions.experiments import patching_experiment, steering_experiment
from surprise_probe.probes.direction import ProbeDirection
from surprise_probe.probes.fit import fit_probes

import surprise_probe as sp
from surprise_probe.analyses.intention.analysis import analyze_intention
from surprise_probe.analyses.intention.prompts import IntentionPrompt
from surprise_probe.analyses.intention.topics import validate_lexicon
from surprise_probe.analyses.policy.gap import policy_gap
from surprise_probe.analyses.policy.prompts import GapPrompt
from surprise_probe.analyses.token_view import token_view_data
from surprise_probe.app.study.runner import StudyResult
from surprise_probe.core.capture.summary import summarize_capture
from surprise_probe.core.forward.passes import TokenMetrics
from surprise_probe.core.utils.notebook import MAX_REPR, TableRows, TextTable, html_table
from surprise_probe.core.utils.progress import tqdm
from surprise_probe.testing import TINY_CORPUS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.ipynb"
MAX_HTML = 4000


def _conv(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


@pytest.fixture(scope="module")
def results(one_thread, tmp_path_factory):
    """One of every result object, on a tiny model, the saved ones saved."""
    tmp = tmp_path_factory.mktemp("results")
    model = tiny_model()
    out = {"TokenMetrics": sp.token_metrics(model, "The quick brown fox.")}
    run = sp.capture(model, TINY_CORPUS * 2, out_dir=tmp / "capture", progress=False)
    out["Capture"] = run
    out["CaptureSummary"] = summarize_capture(run, n_boot=50)
    out["CaptureSummary"].save(tmp / "summary")
    fit = fit_probes(run, "surprise", n_folds=3, n_shuffles=2, n_boot=20, nested=False, progress=False)
    fit.save(tmp / "fit")
    out.update(ProbeFit=fit, SweepResult=fit.sweep, HookResult=fit.sweep.hooks[-1])
    probe = ProbeDirection.load(tmp / "fit" / "probe")
    probe.save(tmp / "probe-copy")
    out["ProbeDirection"] = probe
    items = [_conv("Hello world", text) for text in TINY_CORPUS[:4]]
    steer = steering_experiment(model, items, probe, [-1.0, 0.0, 1.0], random_directions=2, n_boot=20, progress=False)
    steer.save(tmp / "steer")
    out.update(SteeringExperiment=steer, DoseResponse=steer.dose_response, Ablation=steer.ablation)
    pairs = [(items[0], items[1]), (items[2], items[3])]
    patch = patching_experiment(model, pairs, probe, n_boot=20, random_directions=2, progress=False)
    patch.save(tmp / "patch")
    out.update(PatchingExperiment=patch, PatchingResult=patch.patching)
    out["AttributionPatching"] = validate_attribution(model, pairs, direction=probe, progress=False)
    out["DirectionComparison"] = compare_directions(model, TINY_CORPUS[:3], {"a": probe, "b": probe},
                                                    [-1.0, 0.0, 1.0], random_directions=2, n_boot=20, progress=False)
    gap = policy_gap({"tiny": model}, [GapPrompt(f"p{i}", t) for i, t in enumerate(TINY_CORPUS[:3])],
                     max_new_tokens=4, n_boot=20, progress=False)
    gap.save(tmp / "gap")
    out["GapResult"] = gap
    lexicon = validate_lexicon({t: [t] for t in ("fox", "cat", "dog")})
    prompts = [IntentionPrompt(f"g{i}-0", f"g{i}", text, lexicon) for i, text in enumerate(TINY_CORPUS[:2])]
    intention = analyze_intention([model], prompts, progress=False, n_samples=2, max_new_tokens=3, ks=(0, 1),
                                  prefill_tokens=1, prefill_samples=1, n_boot=20, n_folds=2, n_shuffles=1,
                                  followup_phrasings=None)
    out.update(IntentionResult=intention, ModelIntention=intention.models[0])
    out["TokenViewData"] = token_view_data(model, "The quick brown fox jumps.", probe, strength=2.0, attribution=False)
    out["StudyResult"] = StudyResult(tmp, {"quick": True}, {"capture": {"status": "done", "seconds": 3.25},
                                                            "fit": {"status": "failed", "seconds": 1.0,
                                                                    "error": "ValueError: <bad>"}}, 4.25)
    out["StudyResult"].save()
    return out


def _r2(estimate) -> str:
    return f"{estimate.value:.3f}"


# Per class: strings its notebook table must hold (its key number and its sample size).
KEY_NUMBERS = {
    "TokenMetrics": lambda m: [f"{len(m.token_ids)} (", f"{np.nanmean(m.input_surprise[m.scored]):.3f}"],
    "Capture": lambda r: [str(r.n_sequences), str(r.n_tokens)],
    "CaptureSummary": lambda s: [f"{s.input_surprise['mean']:.3f}", f"{s.n_sequences} sequences"],
    "ProbeFit": lambda f: [_r2(f.sweep[f.sweep.best_hook()].r2), f"{f.sweep.n_sequences} sequences"],
    "SweepResult": lambda s: [_r2(s[s.best_hook()].r2), f"{s.n_sequences} sequences", f"{s.n_tokens} tokens"],
    "HookResult": lambda h: [_r2(h.r2), f"{len(h.fold_r2)} folds"],
    "ProbeDirection": lambda d: [f"{d.metrics['r2']['value']:.3f}", f"{d.metrics['n_sequences']} sequences"],
    "SteeringExperiment": lambda e: [f"{e.dose_response.n_sequences} sequences", "z vs random"],
    "DoseResponse": lambda d: [f"{d.n_sequences} sequences, {d.n_tokens} scored tokens", f"{d.z_score:.2f}"],
    "Ablation": lambda a: [f"{a.n_sequences} sequences, {a.n_tokens} scored tokens", f"{a.z_score:.2f}"],
    "PatchingExperiment": lambda p: [f"{p.patching.n_pairs} pairs"],
    "PatchingResult": lambda p: [f"{p.n_pairs} pairs, {p.n_measured_tokens} measured tokens"],
    "AttributionPatching": lambda a: [f"{a.pearson_r:.3f}", f"{a.n_pairs} pairs"],
    "DirectionComparison": lambda c: [f"{c.responses[0].n_sequences} sequences", "slope"],
    "GapResult": lambda g: [f"{len(g.prompts)} prompts", "off/on"],
    "IntentionResult": lambda r: [f"{r.models[0].topic_entropy['value']:.3f}", "2 prompts"],
    "ModelIntention": lambda m: [f"{m.topic_entropy['value']:.3f}", f"{m.topic_entropy['n_prompts']} prompts"],
    "TokenViewData": lambda t: [f"{len(t.tokens)} of {t.n_tokens_total} tokens"],
    "StudyResult": lambda s: ["failed", "3.2 s", "ValueError: &lt;bad&gt;"],
}


@pytest.mark.parametrize("name", sorted(KEY_NUMBERS))
def test_every_result_has_a_short_repr_and_a_small_html_table(results, name):
    obj = results[name]
    assert type(obj).__name__ == name
    text = repr(obj)
    assert text.startswith(f"{name}(") and len(text) <= MAX_REPR and "\n" not in text, text
    html = obj._repr_html_()
    assert html.startswith("<table") and html.endswith("</table>") and len(html) < MAX_HTML, len(html)
    for expected in KEY_NUMBERS[name](obj):
        assert expected in html, (expected, html)
    assert "<script" not in html


@pytest.mark.parametrize("name", ["CaptureSummary", "ProbeFit", "ProbeDirection", "SteeringExperiment",
                                  "PatchingExperiment", "GapResult", "StudyResult"])
def test_the_table_says_where_the_result_was_saved(results, name):
    written = results[name]._saved_to
    first = next(iter(written.values())) if isinstance(written, dict) else written
    assert str(Path(first).parent) in results[name]._repr_html_()


def test_unsaved_results_say_so_and_to_dict_is_unchanged(results):
    sweep = results["SweepResult"]
    assert "not saved" in results["DirectionComparison"]._repr_html_()
    assert "saved" not in results["DoseResponse"]._repr_html_()  # it has no save of its own
    assert "_saved_to" not in results["ProbeFit"].to_dict() and "_saved_to" not in sweep.to_dict()
    json.dumps(results["DoseResponse"].to_dict())


def test_tables_display_as_tables_and_stay_what_they_were(results):
    metrics = results["TokenMetrics"]
    table = metrics.table()
    assert isinstance(table, str) and table.splitlines()[0].split() == ["pos", "token", "surprise", "entropy", "scored"]
    assert len(table.splitlines()) == len(metrics) + 1 and str(table) == table
    assert table._repr_html_().count("<tr>") == len(metrics) + 1 and "| pos |" in table._repr_markdown_()
    summary = results["CaptureSummary"].table()
    assert isinstance(summary, TextTable) and summary.splitlines()[0].startswith("hook")
    for name in ("SweepResult", "ProbeFit", "DoseResponse", "Ablation", "SteeringExperiment", "PatchingResult",
                 "PatchingExperiment", "DirectionComparison"):
        rows = results[name].table()
        assert isinstance(rows, TableRows) and isinstance(rows, list) and isinstance(rows[0], dict), name
        assert json.loads(json.dumps(rows)) == json.loads(json.dumps(list(rows)))
        assert rows._repr_html_().count("<tr>") == len(rows) + 1, name


def test_text_is_escaped_everywhere():
    metrics = TokenMetrics(["<script>", "a&b"], np.array([1, 2]), np.array([np.nan, 1.5]), np.array([2.0, 1.0]),
                           np.array([True, True]))
    for html in (metrics._repr_html_(), metrics.table()._repr_html_(), html_table([("<b>", "<i>")], caption="<u>")):
        assert "<script>" not in html and "<b>" not in html and "<u>" not in html
    assert "&lt;script&gt;" in metrics.table()._repr_html_()


@pytest.mark.parametrize("backend", ["tiny_hooked", "tiny_bridge_model"])
def test_progress_bars_are_quiet_with_progress_false(backend, request, capsys):
    model = request.getfixturevalue(backend)  # tiny_hooked skips on TransformerLens 4.x
    capsys.readouterr()  # whatever building the model printed
    sp.capture(model, TINY_CORPUS[:2], progress=False)
    assert capsys.readouterr().err == ""
    sp.capture(model, TINY_CORPUS[:2], progress=True)
    assert "capture" in capsys.readouterr().err
    assert tqdm.__module__ == "tqdm.std"  # no kernel here: the text bar


def _kernel(tmp_path, monkeypatch):
    """A kernel of this interpreter, whatever kernels the machine has installed."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _execute(notebook, tmp_path, timeout: int):
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_in_a_kernel_bars_figures_and_results_display(tmp_path, monkeypatch):
    _kernel(tmp_path, monkeypatch)
    sources = [
        "import surprise_probe as sp\nfrom surprise_probe.testing import TINY_CORPUS, tiny_model\n"
        "model = tiny_model()",
        "run = sp.capture(model, TINY_CORPUS[:4], batch_size=2, shard_size=2)",
        "quiet = sp.capture(model, TINY_CORPUS[:4], progress=False)",
        "import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[1, 2]))",
        "go.Figure(go.Bar(y=[2, 1]))",
        "run",
        "sp.token_metrics(model, 'A cat.').table()",
    ]
    notebook = _execute(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), tmp_path, 300)
    first, bar, quiet, figure, second_figure, result, table = notebook.cells
    assert "Warning" not in _text(first) and not first.outputs, first.outputs
    assert "capture" in _text(bar) and "100%" in _text(bar)
    assert not quiet.outputs
    # plotly.js once (with the first figure), then each figure as plotly JSON + HTML, nothing fetched
    bundles = [o.data for o in figure.outputs + second_figure.outputs if o.output_type == "display_data"]
    assert len(bundles) == 3 and len(bundles[0]["text/html"]) > 1_000_000
    for bundle in bundles[1:]:
        assert {"application/vnd.plotly.v1+json", "text/html"} <= set(bundle) and "Plotly.newPlot" in bundle["text/html"]
    assert not any("https://" in b["text/html"] for b in bundles[1:])
    assert "<table" in result.outputs[0].data["text/html"] and "Capture(" in result.outputs[0].data["text/plain"]
    assert table.outputs[0].data["text/html"].count("<tr>") >= 3


def test_the_committed_tutorial_has_no_outputs():
    notebook = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 10
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None and not cell.metadata, cell.id
    assert set(notebook.metadata) <= {"kernelspec", "language_info"}


@pytest.mark.real_model
def test_the_tutorial_runs_in_a_kernel_on_the_embedded_model(tmp_path, monkeypatch):
    _kernel(tmp_path, monkeypatch)
    notebook = nbformat.read(TUTORIAL, as_version=4)
    started = time.perf_counter()
    _execute(notebook, tmp_path, timeout=900)  # per cell; raises CellExecutionError on any error
    seconds = time.perf_counter() - started
    cells = {cell.id: cell for cell in notebook.cells}
    assert "Warning" not in _text(cells["setup"]), _text(cells["setup"])
    for cell in notebook.cells:
        assert cell.cell_type != "code" or "TqdmWarning" not in _text(cell), cell.id
    for name in ("token-metrics", "capture", "capture-summary", "sweep", "probe", "steer", "gap"):
        html = next(o.data["text/html"] for o in cells[name].outputs if o.output_type == "execute_result")
        assert html.startswith("<table") and len(html) < MAX_HTML, name
    for name in ("token-figure", "sweep-figure", "steer-figure"):
        bundles = [o.data for o in cells[name].outputs if o.output_type == "display_data"]
        assert any({"application/vnd.plotly.v1+json", "text/html"} <= set(b) for b in bundles), name
    for name in ("token-table", "sweep-table", "steer-table"):
        assert "<table" in cells[name].outputs[0].data["text/html"], name
    nbformat.write(notebook, tmp_path / "tutorial-executed.ipynb")
    print(f"tutorial ran in {seconds:.0f} s; executed copy: {tmp_path / 'tutorial-executed.ipynb'}")
