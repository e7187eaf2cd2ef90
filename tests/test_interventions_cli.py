"""``surprise-probe steer`` / ``patch`` end to end on the tiny model, with a real probe file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surprise_probe import probes
from surprise_probe.app.cli import main
from surprise_probe.app.commands import _common
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.files import read_pairs
from tests.conftest import CONVERSATION, TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def probe_file(tiny_hooked, tmp_path):
    d = np.random.default_rng(0).normal(size=tiny_hooked.cfg.d_model)
    direction = probes.ProbeDirection(
        d / np.linalg.norm(d), mean=0.1, std=1.7, hook="blocks.1.hook_resid_post", layer=1,
        model_id=model_id(tiny_hooked), d_model=tiny_hooked.cfg.d_model, target="output_entropy",
    )
    return direction.save(tmp_path / "probe")


@pytest.fixture
def use_tiny(monkeypatch, tiny_hooked):
    monkeypatch.setattr(_common, "load_model", lambda name, **kwargs: tiny_hooked)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_steer_writes_json_and_offline_html(use_tiny, probe_file, tmp_path, capsys):
    inputs = _jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATION}, {"text": TEXTS[0]}, {"text": TEXTS[1]}])
    out = tmp_path / "steer"
    code = main(["steer", "--probe", str(probe_file), "--input", str(inputs), "--strengths", "-2", "0", "2",
                 "--random-directions", "3", "--out", str(out), "--samples", "1", "--max-new-tokens", "3",
                 "--n-boot", "50", "--no-progress"])
    assert code == 0
    payload = json.loads((out / "steer.json").read_text())
    assert payload["config"]["strengths"] == [-2.0, 0.0, 2.0]
    assert payload["probe"]["sha256"] and payload["software_versions"]["torch"]
    result = payload["dose_response"]
    assert result["hook"] == "blocks.1.hook_resid_post" and result["std"] == pytest.approx(1.7)
    assert result["labels"] == ["probe", "orthogonal", "random 0", "random 1", "random 2"]
    assert np.asarray(result["entropy"]).shape == (5, 3)
    assert len(payload["ablation"]["entropy_change"]) == 5
    assert [row["strength"] for row in payload["samples"]] == [-2.0, 0.0, 2.0]
    for name in ("dose_response.html", "ablation.html"):
        html = (out / name).read_text()
        assert "plotly.js" in html or "Plotly" in html
        assert len(html) > 1_000_000  # plotly.js embedded: opens offline
    printed = capsys.readouterr().out
    assert "entropy slope" in printed
    # 3 random directions and 3 sequences are too few: said in the printout and the JSON
    assert "warning: z from 3 random directions" in printed and "CIs from 3 sequences" in printed
    assert payload["warnings"] == [line.removeprefix("warning: ") for line in printed.splitlines()
                                   if line.startswith("warning: ")]


def test_patch_writes_heatmap(use_tiny, probe_file, tmp_path, capsys):
    def conversation(answer):
        return [{"role": "user", "content": "Hello world, how are you today?"}, {"role": "assistant", "content": answer}]

    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"source": {"messages": conversation("A cat sat on the mat.")},
         "destination": {"messages": conversation("Rivers flow to the sea.")}},
        {"source": conversation("Numbers like 12 appear."), "destination": conversation("The quick brown fox.")},
    ])
    out = tmp_path / "patch"
    code = main(["patch", "--probe", str(probe_file), "--pairs", str(pairs), "--out", str(out),
                 "--groups", "prompt", "response", "first2", "--n-boot", "50", "--random-directions", "3",
                 "--no-progress"])
    assert code == 0
    result = json.loads((out / "patch.json").read_text())["patching"]
    assert result["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert np.asarray(result["fraction"]["all"]).shape == (2, 3)
    np.testing.assert_allclose(np.asarray(result["fraction"]["all"])[:, 1], 1.0, atol=1e-4)
    # random-direction controls in the JSON, the printout and the heatmap, with the small-sample warning
    assert result["random_directions"] == 3 and np.asarray(result["random_fraction"]).shape == (2, 3, 3)
    printed = capsys.readouterr().out
    assert "3 random directions (control for 'direction')" in printed and "use at least 10" in printed
    html = (out / "patching.html").read_text()
    assert "Plotly" in html and "3 random directions (mean; min..max)" in html


def test_cli_errors_name_the_bad_value(use_tiny, tiny_hooked, tmp_path, capsys):
    d = np.ones(tiny_hooked.cfg.d_model) / np.sqrt(tiny_hooked.cfg.d_model)
    other = probes.ProbeDirection(d, mean=0.0, std=1.0, hook="blocks.0.hook_resid_post", layer=0,
                                  model_id="another-model", d_model=tiny_hooked.cfg.d_model, target="x")
    path = other.save(tmp_path / "other")
    inputs = _jsonl(tmp_path / "in.jsonl", [{"text": TEXTS[0]}])
    assert main(["steer", "--probe", str(path), "--input", str(inputs), "--out", str(tmp_path / "o")]) == 1
    assert "another-model" in capsys.readouterr().err
    bad_pairs = _jsonl(tmp_path / "bad.jsonl", [{"source": {"text": TEXTS[0]}}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with 'source' and 'destination'"):
        read_pairs(bad_pairs)


def test_max_batch_tokens_is_validated_recorded_and_bounds_the_forwards(use_tiny, probe_file, tmp_path, capsys,
                                                                         monkeypatch):
    from surprise_probe.interventions import experiments

    items = [{"messages": CONVERSATION}, {"text": TEXTS[0]}]
    inputs = _jsonl(tmp_path / "in.jsonl", items)
    common = ["--probe", str(probe_file), "--n-boot", "20", "--no-progress"]
    steer = ["steer", *common, "--input", str(inputs), "--strengths", "-1", "1", "--random-directions", "1",
             "--no-ablation"]
    for bad in ("0", "-3", "1.5"):
        assert main([*steer, "--out", str(tmp_path / "bad"), "--max-batch-tokens", bad]) == 2
        assert f"argument --max-batch-tokens: expected an integer >= 1, got {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # One token per forward: each condition row runs alone, so every input takes one clean forward
    # plus one per condition (3 directions x 2 strengths), against fewer with the default budget.
    payloads = {}
    for name, extra in (("one", ["--max-batch-tokens", "1"]), ("default", [])):
        assert main([*steer, "--out", str(tmp_path / name), *extra]) == 0
        payloads[name] = json.loads((tmp_path / name / "steer.json").read_text())
    assert payloads["one"]["config"]["max_batch_tokens"] == 1
    assert payloads["default"]["config"]["max_batch_tokens"] == 8192
    assert payloads["one"]["dose_response"]["n_forwards"] == len(items) * (1 + 3 * 2)
    assert payloads["default"]["dose_response"]["n_forwards"] < len(items) * (1 + 3 * 2)
    np.testing.assert_allclose(payloads["one"]["dose_response"]["entropy"],
                               payloads["default"]["dose_response"]["entropy"], atol=1e-5, rtol=0)
    # patch passes it through to the library call and records it
    seen = []
    real = experiments.activation_patching
    monkeypatch.setattr(experiments, "activation_patching",
                        lambda *args, **kwargs: seen.append(kwargs["max_batch_tokens"]) or real(*args, **kwargs))
    def conversation(answer):
        return [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": answer}]

    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"source": conversation("A cat sat on the mat."),
                                               "destination": conversation("Rivers flow to the sea.")}])
    assert main(["patch", *common, "--pairs", str(pairs), "--out", str(tmp_path / "patch"), "--groups", "response",
                 "--random-directions", "0", "--layers", "1", "--max-batch-tokens", "40"]) == 0
    assert seen == [40]
    assert json.loads((tmp_path / "patch" / "patch.json").read_text())["config"]["max_batch_tokens"] == 40
