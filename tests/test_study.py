"""The study end to end on a tiny model: one model load, stages, config-matched resume, failures recorded."""

import json

import pytest
import torch
from surprise_probe.probes.direction import ProbeDirection

from surprise_probe.app import study as study_module
from surprise_probe.app.cli import main
from surprise_probe.app.commands import _common
from surprise_probe.app.study import runner as study_runner
from surprise_probe.app.study.stages import StudyContext
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.utils.jsonio import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def long_context_folder(tmp_path_factory):
    """A tiny random Llama with room for short conversations (n_ctx 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surprise_probe.testing import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-study-lm")
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def counted_loads(monkeypatch):
    """Count model loads through the one loader the commands use."""
    calls = []
    real = _common.load_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_common, "load_model", counting)
    return calls


def _inputs(tmp_path):
    inputs = tmp_path / "in.jsonl"
    with open(inputs, "w") as handle:
        for i in range(8):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"Question {i}: how are you?"},
                {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3)},
            ]}) + "\n")
    return inputs


def _argv(folder, inputs, out, *extra):
    return ["study", "--model", str(folder), "--input", str(inputs), "--out", str(out), "--quick", "--steer-inputs", "3",
            "--random-directions", "2", "--strengths", "-2", "0", "2", "--n-boot", "50", "--patch-pairs", "3",
            "--gap-prompts", "3", "--intention-samples", "2", "--norm-inputs", "2", "--no-progress", *extra]


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{path}: {token}"))


STAGES = ["capture", "fit_surprise", "fit_entropy", "steer", "norm", "compare", "patch", "attribution", "gap",
          "intention", "report"]


def test_study_runs_end_to_end_loads_the_model_once_and_resumes(long_context_folder, tmp_path, counted_loads, capsys):
    out = tmp_path / "s"
    argv = _argv(long_context_folder, _inputs(tmp_path), out)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "study sizes (--quick)" in printed and "estimated time:" in printed and "patch + attribution" in printed
    assert len(counted_loads) == 1  # one load for every stage
    for path in ("capture/manifest.json", "fit_surprise/sweep.json", "fit_surprise/probe.json",
                 "fit_entropy/sweep.json", "steer/steer.json", "norm/norm_control.json",
                 "compare/direction_comparison.json",
                 "patch/pairs.json", "patch/patch.json", "attribution/attribution.json", "attribution/token_view.json",
                 "gap/gap.json", "intention/intention.json", "report.html", "index.html", "study.json", "config.json"):
        assert (out / path).exists(), path
    jsons = list(out.rglob("*.json"))
    assert len(jsons) > 20
    for path in jsons:  # every JSON file is strict JSON (no NaN / Infinity tokens)
        _strict(path)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("plotly.js v") <= 2 and "<script src=" not in report and len(report) < 10_000_000
    for stage in ("capture", "fit_surprise", "fit_entropy", "steer", "norm", "compare", "patch", "attribution",
                  "token_view", "gap", "intention"):
        assert f"id='stage-{stage}'" in report, stage
    assert "report.html" in (out / "index.html").read_text()
    pairs = read_json(out / "patch" / "pairs.json")["pairs"]
    assert len(pairs) == 3 and all(p["destination_answer_from"] != p["id"] for p in pairs)
    steer = read_json(out / "steer" / "steer.json")
    assert steer["dose_response"]["strengths"] == [-2.0, 0.0, 2.0]
    assert len(steer["probe"]["sha256"]) == 64 and steer["n_sequences"] == 3
    stages = read_json(out / "study.json")["stages"]
    assert sorted(stages) == sorted(STAGES) and [s["status"] for s in stages.values()] == ["done"] * len(STAGES)
    # A rerun with the same settings resumes every stage that writes a folder.
    assert main(argv) == 0
    stages = read_json(out / "study.json")["stages"]
    assert {name: s["status"] for name, s in stages.items()} == {
        **{name: "resumed" for name in STAGES}, "report": "done"}
    assert len(counted_loads) == 2


def test_a_rerun_with_other_settings_is_refused_or_recomputed(long_context_folder, tmp_path, counted_loads, capsys):
    out = tmp_path / "s"
    inputs = _inputs(tmp_path)
    assert main(_argv(long_context_folder, inputs, out)) == 0
    capture_manifest = (out / "capture" / "manifest.json").read_bytes()
    steer_before = (out / "steer" / "steer.json").read_bytes()
    capsys.readouterr()
    changed = _argv(long_context_folder, inputs, out)
    changed[changed.index("--strengths") + 1 : changed.index("--strengths") + 4] = ["-4", "0", "4"]
    # Refused before any model is loaded, naming the stage and the setting.
    loads = len(counted_loads)
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steer" in err and "strengths" in err and "Traceback" not in err
    assert len(counted_loads) == loads and (out / "steer" / "steer.json").read_bytes() == steer_before
    # --overwrite recomputes the stage that differs and resumes the others; the user's files stay.
    (out / "my_notes.txt").write_text("top")
    (out / "steer" / "my_notes.txt").write_text("inside a stage")
    assert main([*changed, "--overwrite"]) == 0
    assert (out / "my_notes.txt").read_text() == "top"
    assert (out / "steer" / "my_notes.txt").read_text() == "inside a stage"
    assert "my_notes.txt" not in read_json(out / "steer" / "config.json")["outputs"]
    stages = read_json(out / "study.json")["stages"]
    assert stages["capture"]["status"] == "resumed" and stages["steer"]["status"] == "done"
    assert (out / "capture" / "manifest.json").read_bytes() == capture_manifest
    assert read_json(out / "steer" / "steer.json")["dose_response"]["strengths"] == [-4.0, 0.0, 4.0]


def test_a_failing_stage_is_recorded_and_the_others_run(long_context_folder, tmp_path, monkeypatch, capsys):
    stages = study_module.default_stages()

    def broken(ctx, folder):
        raise RuntimeError("entropy probe exploded")

    stages[2].run = broken  # fit_entropy
    monkeypatch.setattr(study_runner, "default_stages", lambda: stages)  # where run_study looks it up
    out = tmp_path / "s"
    assert main(_argv(long_context_folder, _inputs(tmp_path), out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fit_entropy" in err[0] and "entropy probe exploded" in err[0]
    record = read_json(out / "study.json")["stages"]
    status = {name: s["status"] for name, s in record.items()}
    # compare needs both probes: skipped; every stage that does not need fit_entropy still ran
    assert status == {**{name: "done" for name in STAGES}, "fit_entropy": "failed", "compare": "skipped"}
    assert "entropy probe exploded" in record["fit_entropy"]["error"]
    assert record["compare"]["error"] == "needs stage 'fit_entropy', which did not finish"
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "RuntimeError: entropy probe exploded" in report and "9 of 11 ok" in report


def test_study_reads_a_txt_input(long_context_folder, tmp_path):
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(6)) + "\n")
    out = tmp_path / "s"
    assert main(_argv(long_context_folder, texts, out)) == 0
    assert read_json(out / "steer" / "steer.json")["n_sequences"] == 3


@pytest.mark.real_model
def test_the_whole_study_on_the_embedded_model(tmp_path, capsys):
    """Every stage on SmolLM2-135M-Instruct at the smallest sizes (about a minute on 2 cores): the
    chain holds together on a real model with a chat template, and report.html has every section."""
    out = tmp_path / "s"
    argv = ["study", "--out", str(out), "--quick", "--max-inputs", "6", "--steer-inputs", "2", "--strengths", "-4", "4",
            "--random-directions", "1", "--n-boot", "50", "--patch-pairs", "2", "--patch-layers", "2",
            "--sample-tokens", "8", "--token-view-tokens", "24", "--gap-prompts", "2", "--intention-prompts", "1",
            "--intention-samples", "2", "--norm-inputs", "2", "--gap-temperatures", "--no-progress"]
    assert main(argv) == 0
    stages = read_json(out / "study.json")["stages"]
    assert {name: s["status"] for name, s in stages.items()} == {name: "done" for name in STAGES}
    for path in out.rglob("*.json"):
        _strict(path)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "11 of 11 ok" in report and "smollm2-135m-instruct" in report
    assert (out / "report.html").stat().st_size < 10_000_000
    view = read_json(out / "attribution" / "token_view.json")
    assert view["tokens"][0] == "<|im_start|>" and view["positions"][0] == 0  # starts at the beginning


def test_stages_share_one_direction_object_per_probe(tiny_hooked, tmp_path):
    """The study's stages get the probe as one in-memory object (read and verified once), not a
    file each stage reloads; the file is for provenance and for a resumed study."""
    d = torch.randn(tiny_hooked.cfg.d_model, generator=torch.Generator().manual_seed(0)).double().numpy()
    probe = ProbeDirection(d / (d ** 2).sum() ** 0.5, mean=0.0, std=1.5, hook="blocks.1.hook_resid_post", layer=1,
                           model_id=model_id(tiny_hooked), d_model=tiny_hooked.cfg.d_model, target="surprise")
    probe.save(tmp_path / "probe")
    ctx = StudyContext(model=tiny_hooked, items=[], out=tmp_path, settings={}, model_name="tiny")
    first = ctx.direction(tmp_path / "probe")
    assert ctx.direction(str(tmp_path / "probe")) is first  # read once
    assert first.std == 1.5 and first.hook == probe.hook
    ctx.directions[str(tmp_path / "other")] = probe  # what the fit stage hands over in memory
    assert ctx.direction(tmp_path / "other") is probe  # no file needed
