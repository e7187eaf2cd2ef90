"""End to end on a real (tiny, random) TransformerLens model: capture -> fit -> CLI outputs."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest
from surprise_probe.probes import ProbeDirection, fit_sweep
from surprise_probe.probes.plots import alpha_curve_figure, layer_sweep_figure

import surprise_probe as sp
from surprise_probe.testing import TINY_CORPUS, tiny_model, tiny_tokenizer

TEXTS = [f"{TINY_CORPUS[i % 6]} {TINY_CORPUS[(7 * i + 1) % 6]}" for i in range(24)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def capture_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("capture")
    sp.capture(model, TEXTS, out_dir=folder, shard_size=5, progress=False)
    return folder


def test_fit_on_a_capture_folder(capture_dir):
    run = sp.load_capture(capture_dir)
    result = fit_sweep(run, n_shuffles=4, n_boot=50, progress=False)
    assert [r.hook for r in result.hooks] == run.hooks
    assert [r.depth for r in result.hooks] == [0, 1, 2]
    expected = int(sum(((s.positions > 0) & s.scored).sum() for s in run.shards()))
    assert result.n_tokens == expected
    for r in result.hooks:
        assert np.isfinite(r.r2.value) and r.r2.low <= r.r2.value <= r.r2.high
    assert result.controls["surprise_entropy_r"] is not None
    figure = layer_sweep_figure(result)
    assert isinstance(figure, go.Figure)
    names = {trace.name for trace in figure.data}
    assert {"probe", "token-identity mean", "embedding probe (token identity)"} <= names
    assert isinstance(alpha_curve_figure(result), go.Figure)


def test_cli_fit_writes_table_plot_and_probe(capture_dir, model, tmp_path, tokenizer, capsys):
    from surprise_probe.app.cli import main

    out = tmp_path / "fit"
    code = main(
        [
            "fit",
            "--activations",
            str(capture_dir),
            "--target",
            "entropy",
            "--out",
            str(out),
            "--folds",
            "3",
            "--shuffles",
            "3",
            "--n-boot",
            "50",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "best hook" in printed
    # the printout names the tokens, every baseline and the probe beyond each control, by layer
    assert "tokens: the scored span (assistant content / whole texts) at position > 0" in printed
    for line in ("position (sequence and scored span) R^2:", "bigram (previous + current token) R^2:",
                 "embedding-layer probe R^2:", "| hook | layer |", "beyond position", "beyond bigram",
                 "| blocks.0.hook_resid_pre | embed |"):
        assert line in printed, line
    for name in ("sweep.csv", "sweep.json", "sweep.html", "probe.safetensors", "probe.json", "heldout.npz"):
        assert (out / name).exists(), name
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["target"] == "entropy" and summary["config"]["n_folds"] == 3
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 3
    assert (out / "sweep.html").stat().st_size > 1_000_000  # plotly.js embedded: opens offline
    direction = ProbeDirection.load(out / "probe", model=model)
    assert direction.model_id == sp.model_id(model) and direction.d_model == model.cfg.d_model
    other = tiny_model(seed=1, tokenizer=tokenizer)
    assert sp.model_id(other) == other.cfg.model_name == sp.model_id(model).replace("-s0", "-s1")
    with pytest.raises(ValueError, match=sp.model_id(other)):
        ProbeDirection.load(out / "probe", model=other)


def test_cli_reports_bad_input_clearly(capture_dir, tmp_path, capsys):
    from surprise_probe.app.cli import main

    code = main(
        [
            "fit",
            "--activations",
            str(capture_dir),
            "--out",
            str(tmp_path / "x"),
            "--hooks",
            "blocks.5.hook_resid_post",
            "--no-progress",
        ]
    )
    assert code == 2
    assert (
        "hook 'blocks.5.hook_resid_post' was not captured; captured hooks:"
        in capsys.readouterr().err
    )
    code = main(
        [
            "fit",
            "--activations",
            str(capture_dir),
            "--out",
            str(tmp_path / "x"),
            "--target",
            str(tmp_path / "nope.npy"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "neither 'surprise', 'entropy' nor an existing .npy/.npz file" in capsys.readouterr().err


def test_user_target_file_roundtrip(capture_dir, tmp_path):
    run = sp.load_capture(capture_dir)
    seq = run.column("sequence_ids")
    pos = run.column("positions")
    values = np.sin(seq + 0.1 * pos)
    np.savez(tmp_path / "label.npz", sequence_ids=seq, positions=pos, values=values)
    result = fit_sweep(
        run, tmp_path / "label.npz", hooks=run.hooks[-1:], n_shuffles=0, n_boot=10, progress=False
    )
    # by default a custom target is fitted on the same tokens as surprise: the scored span at position > 0
    in_span = run.column("scored").astype(bool) & (pos > 0)
    assert result.target == "label" and result.n_tokens == int(in_span.sum()) < run.n_tokens
    assert result.config["span"] == "scored" and result.config["n_tokens_outside_span"] == run.n_tokens - in_span.sum()
    np.testing.assert_array_equal(result.predictions["target"], values[in_span])
    every = fit_sweep(run, tmp_path / "label.npz", hooks=run.hooks[-1:], n_shuffles=0, n_boot=10, span="all",
                      progress=False)
    assert every.n_tokens == run.n_tokens and every.config["n_tokens_outside_span"] == 0
    np.save(tmp_path / "short.npy", np.stack([seq[:3], pos[:3] + 1000, values[:3]], axis=1))
    with pytest.raises(ValueError, match="position 1000"):
        fit_sweep(run, tmp_path / "short.npy", progress=False)


def test_docs_example_runs(tmp_path, monkeypatch):
    """The Python example in docs/probes.md runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "probes.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/probes.md", "exec"), {})
    assert (tmp_path / "runs" / "doc-probe.safetensors").exists()
    assert (tmp_path / "runs" / "doc-sweep.html").stat().st_size > 1_000_000  # plotly.js embedded


def test_a_target_file_named_like_a_builtin_is_read_as_a_file(capture_dir, tmp_path):
    run = sp.load_capture(capture_dir)
    values = np.cos(run.column("positions").astype(float))
    np.save(tmp_path / "surprise.npy", values)
    result = fit_sweep(
        run, tmp_path / "surprise.npy", hooks=run.hooks[:1], n_shuffles=0, n_boot=10, progress=False
    )
    scored = run.column("scored").astype(bool) & (run.column("positions") > 0)
    np.testing.assert_allclose(result.predictions["target"], values[scored])
