"""Local and other-model surprise targets on tiny models, against direct per-token references."""

import numpy as np
import pytest
import torch
from surprise_probe.probes import fit_sweep
from surprise_probe.probes.surprise_targets import (
    computed_target,
    local_surprise,
    other_model_surprise,
    parse_target_spec,
)
from surprise_probe.probes.targets import load_target_file, lookup_target

import surprise_probe as sp
from surprise_probe.testing import TINY_CORPUS


@pytest.fixture(scope="module")
def run(tiny_hooked, one_thread):
    conversation = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": TINY_CORPUS[0]}]
    return sp.capture(tiny_hooked, [*TINY_CORPUS, conversation], progress=False)


def reference_local(model, run, window):
    out = {}
    for shard in run.shards():
        for sequence in np.unique(shard.sequence_ids):
            rows = shard.sequence_ids == sequence
            ids, scored = shard.token_ids[rows], shard.scored[rows]
            for t in range(1, len(ids)):
                if scored[t]:
                    context = torch.as_tensor(ids[max(0, t - window) : t])[None]
                    with torch.no_grad():
                        logits = model(context, return_type="logits")[0, -1].double()
                    out[int(sequence), t] = float(-torch.log_softmax(logits, -1)[ids[t]])
    return out


@pytest.mark.parametrize("window", [1, 3])
def test_local_surprise_equals_one_forward_per_window(tiny_hooked, run, window):
    target = local_surprise(tiny_hooked, run, window, batch_size=7, progress=False)
    expected = reference_local(tiny_hooked, run, window)
    got = dict(zip(zip(target.sequence_ids.tolist(), target.positions.tolist(), strict=True), target.values, strict=True))
    assert set(got) == set(expected)  # exactly the scored tokens at position > 0
    assert np.allclose([got[k] for k in expected], list(expected.values()), atol=2e-4)


def test_local_surprise_with_a_long_window_is_the_captured_surprise(tiny_hooked, run):
    target = local_surprise(tiny_hooked, run, 10_000, progress=False)
    seq, pos = run.column("sequence_ids", True), run.column("positions", True)
    captured = run.column("input_surprise", True)
    values = lookup_target(target, seq, pos)
    assert np.allclose(values[pos > 0], captured[pos > 0], atol=2e-4)


def test_the_same_model_as_reader_reproduces_its_own_surprise(tiny_hooked, run):
    target = other_model_surprise(run, tiny_hooked.tokenizer, tiny_hooked, progress=False)
    values = lookup_target(target, run.column("sequence_ids", True), run.column("positions", True))
    captured = run.column("input_surprise", True)
    positions, sequence_ids = run.column("positions", True), run.column("sequence_ids", True)
    assert np.isfinite(values[positions > 0]).all()  # every token has a character span here
    # plain texts re-tokenize to the same ids after the same BOS, so values match one to one; the
    # conversation is read with the reader's BOS in front of the template, so it differs a little
    plain = (positions > 0) & (sequence_ids < len(TINY_CORPUS))
    assert np.allclose(values[plain], captured[plain], atol=2e-4)


def test_computed_target_saves_and_feeds_fit_as_target_and_covariate(tiny_hooked, run, tmp_path):
    target, info = computed_target(run, "local:2", load_model=lambda name: tiny_hooked, progress=False)
    assert info["n_tokens_with_value"] == len(target.values) == info["n_selected_tokens"]
    paths = target.save(tmp_path / "local-2", info)
    loaded = load_target_file(paths["npz"])
    assert np.array_equal(loaded.values, target.values)
    as_target = fit_sweep(run, paths["npz"], n_folds=3, n_shuffles=0, n_boot=20, nested=False, progress=False)
    assert as_target.n_tokens == len(target.values)
    beyond = fit_sweep(run, "surprise", covariates={"local-2": target}, n_folds=3, n_shuffles=0, n_boot=20,
                       nested=False, progress=False)
    assert "local-2" in beyond.controls["covariate_r2"]
    assert "local-2" in beyond[beyond.best_hook()].beyond_r2


def test_target_specs_are_parsed_and_checked():
    assert parse_target_spec("local:4").name == "local-4"
    assert parse_target_spec("model:gemma-3-270m").name == "model-gemma-3-270m"
    assert parse_target_spec("entropy") is None
    with pytest.raises(ValueError, match="integer >= 1, got '0'"):
        parse_target_spec("local:0")
    with pytest.raises(ValueError, match="expected model:NAME"):
        parse_target_spec("model:")


def test_cli_fit_with_sources_and_a_residualizing_target_file(tiny_hooked, tmp_path, capsys):
    import json

    from surprise_probe.app.cli import main

    texts = [f"{TINY_CORPUS[i % 6]} {TINY_CORPUS[(5 * i + 1) % 6]}" for i in range(12)]
    folder = tmp_path / "capture"
    run = sp.capture(tiny_hooked, texts, out_dir=folder, progress=False)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "source": "own" if i % 2 else "human"}) + "\n"
                              for i, t in enumerate(texts)))
    local, info = computed_target(run, "local:2", load_model=lambda name: tiny_hooked, progress=False)
    local_file = local.save(tmp_path / "local-2", info)["npz"]
    out = tmp_path / "fit"
    args = ["fit", "--activations", str(folder), "--out", str(out), "--folds", "3", "--shuffles", "2",
            "--n-boot", "30", "--no-progress", "--sources", str(inputs), "--residualize-on", str(local_file)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "position (sequence and scored span) R^2" in printed and "covariate local-2 R^2" in printed
    payload = json.loads((out / "sweep.json").read_text())
    assert set(payload["by_source"]) == {"own", "human"}
    assert "local-2" in payload["controls"]["covariate_r2"]
    assert (out / "sources.html").exists()
    bad = tmp_path / "short.jsonl"
    bad.write_text(json.dumps({"text": "x", "source": "own"}) + "\n")
    assert main([*args[:4], str(tmp_path / "fit2"), *args[5:-4], "--sources", str(bad)]) == 2
    assert "has 1 inputs but the capture has 12 sequences" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "fit3"), "--residualize-on", "local:x"]) == 2
    assert "the window of local:W must be an integer >= 1" in capsys.readouterr().err
