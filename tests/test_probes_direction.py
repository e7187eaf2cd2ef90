"""Probe directions: activation-space mapping, save/load roundtrip, refusal of other models."""

import hashlib
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy
import torch
from sklearn.utils.validation import check_is_fitted
from surprise_probe.probes import ArrayCapture, ProbeDirection, RidgeProbe, fit_sweep

from surprise_probe.core.capture.run import capture
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.core.models.basis import model_fingerprint
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.utils.jsonio import to_json
from surprise_probe.testing import TINY_CORPUS, tiny_model


def _model(name="planted", d_model=6):
    return SimpleNamespace(cfg=SimpleNamespace(model_name=name, d_model=d_model))


@pytest.fixture(scope="module")
def sweep_and_data():
    rng = np.random.default_rng(0)
    n_seq, length, d = 40, 10, 6
    X = rng.normal(size=(n_seq * length, d)) * np.array([1, 10, 0.1, 1, 5, 1]) + 7
    weights = np.array([1.0, -0.2, 3.0, 0.0, 0.1, 0.5])
    y = X @ weights + 0.1 * rng.normal(size=len(X))
    run = ArrayCapture(
        {"blocks.2.hook_resid_post": X},
        token_ids=rng.integers(0, 9, len(X)),
        sequence_ids=np.repeat(np.arange(n_seq), length),
        positions=np.tile(np.arange(length), n_seq),
        input_surprise=y,
        model_id="planted",
    )
    return fit_sweep(run, n_shuffles=2, n_boot=20, progress=False), X, y


def test_direction_is_the_unit_weight_in_activation_space(sweep_and_data):
    sweep, X, y = sweep_and_data
    d = sweep.direction()
    assert d.hook == "blocks.2.hook_resid_post" and d.layer == 2 and d.d_model == 6
    assert np.linalg.norm(d.direction) == pytest.approx(1.0)
    positions = X[np.tile(np.arange(10), 40) > 0]
    # same prediction as an all-token RidgeProbe at the chosen alpha (standardisation undone)
    probe = RidgeProbe(alpha=sweep["blocks.2.hook_resid_post"].alpha).fit(
        positions, y[np.tile(np.arange(10), 40) > 0]
    )
    np.testing.assert_allclose(d.direction, probe.direction_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.predict(positions), probe.predict(positions), rtol=1e-6)
    projection = positions @ d.direction
    assert d.mean == pytest.approx(projection.mean()) and d.std == pytest.approx(projection.std())
    assert np.dot(d.direction, [1.0, -0.2, 3.0, 0.0, 0.1, 0.5]) > 0  # points towards higher target


def test_save_load_roundtrip(sweep_and_data, tmp_path):
    d = sweep_and_data[0].direction()
    meta = d.save(tmp_path / "probe")
    weights = tmp_path / "probe.safetensors"
    assert meta == tmp_path / "probe.json" and weights.exists() and not (tmp_path / "probe.npz").exists()
    # The weights file is plain safetensors: any reader gets the direction back.
    np.testing.assert_array_equal(safetensors.numpy.load_file(str(weights))["direction"], d.direction)
    info = json.loads(meta.read_text())
    assert {"model_id", "hook", "layer", "target", "data_hash", "metrics", "versions", "model"} <= set(info)
    assert info["format_version"] == 2 and info["weights_file"] == "probe.safetensors"
    for path in (tmp_path / "probe", weights, tmp_path / "probe.json"):
        loaded = ProbeDirection.load(path, model=_model())
        np.testing.assert_array_equal(loaded.direction, d.direction)
        assert (loaded.mean, loaded.std, loaded.hook, loaded.target) == (
            d.mean,
            d.std,
            d.hook,
            d.target,
        )
        assert loaded.metrics["r2"]["value"] == pytest.approx(d.metrics["r2"]["value"])
        assert loaded.data_hash == d.data_hash


def _old_format_files(stem, direction, with_artifact_hash):
    """A probe as format 1 wrote it (.npz + JSON), built here without ProbeDirection.save."""
    info = {"format_version": 1, "kind": "probe_direction", "model_id": "planted", "d_model": 3,
            "hook": "blocks.2.hook_resid_post", "layer": 2, "target": "surprise", "mean": 0.25, "std": 1.5,
            "coef_norm": 2.0, "intercept": -1.0, "data_hash": "abc", "metrics": {"alpha": 10.0},
            "versions": {"numpy": np.__version__},
            "direction_sha256": hashlib.sha256(direction.astype(np.float64).tobytes()).hexdigest()}
    if with_artifact_hash:  # files written between the artifact-hash fix and format 2
        digest = hashlib.sha256(direction.astype(np.float64).tobytes())
        digest.update(to_json(info).encode())
        info["artifact_sha256"] = digest.hexdigest()
    np.savez(stem.with_name(stem.name + ".npz"), direction=direction)
    stem.with_name(stem.name + ".json").write_text(json.dumps(info))


@pytest.mark.parametrize("with_artifact_hash", [False, True])
def test_directions_saved_in_format_1_still_load(tmp_path, with_artifact_hash):
    direction = np.array([2.0, -1.0, 2.0]) / 3.0
    _old_format_files(tmp_path / "old", direction, with_artifact_hash)
    if not with_artifact_hash:  # written before the artifact hash: loads only when asked to, knowingly
        with pytest.raises(ValueError, match=r"old\.json has no artifact hash .*allow_unverified=True "
                                             r"\(CLI: steer / patch --allow-unverified-probe\)"):
            ProbeDirection.load(tmp_path / "old.npz", model=_model(d_model=3))
    loaded = ProbeDirection.load(tmp_path / "old.npz", model=_model(d_model=3), allow_unverified=not with_artifact_hash)
    np.testing.assert_array_equal(loaded.direction, direction)
    assert (loaded.std, loaded.coef_norm, loaded.intercept, loaded.model) == (1.5, 2.0, -1.0, {})
    x = np.array([[3.0, 0.0, 3.0]])
    assert loaded.predict(x).tolist() == [2.0 * 4.0 - 1.0]
    # Saved again, it is format 2 and reads back the same.
    again = ProbeDirection.load(loaded.save(tmp_path / "new"))
    assert json.loads((tmp_path / "new.json").read_text())["format_version"] == 2
    np.testing.assert_array_equal(again.direction, direction)


def test_to_sklearn_is_a_fitted_ridge_probe_with_the_same_predictions(sweep_and_data):
    sweep, X, y = sweep_and_data
    d = sweep.direction()
    estimator = d.to_sklearn()
    assert isinstance(estimator, RidgeProbe) and estimator.alpha == sweep["blocks.2.hook_resid_post"].alpha
    check_is_fitted(estimator)
    keep = np.tile(np.arange(10), 40) > 0
    # Reference: an independently fitted RidgeProbe at the chosen alpha on the probe's training tokens.
    reference = RidgeProbe(alpha=estimator.alpha).fit(X[keep], y[keep])
    np.testing.assert_allclose(estimator.predict(X), reference.predict(X), rtol=1e-6)
    assert estimator.score(X[keep], y[keep]) == pytest.approx(reference.score(X[keep], y[keep]), rel=1e-9)
    with pytest.raises(ValueError, match="X has 5 features, but RidgeProbe is expecting 6"):
        estimator.predict(X[:, :5])
    unscaled = ProbeDirection(np.array([1.0, 0.0]), 0.0, 1.0, "h", 0, "m", 2, "surprise")
    with pytest.raises(ValueError, match="without the probe's scale"):
        unscaled.to_sklearn()


def test_export_vector_reads_the_same_projection_in_the_hf_basis():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=5) + 0.7
    d = ProbeDirection(raw / np.linalg.norm(raw), mean=0.0, std=3.0, hook="blocks.4.hook_resid_post", layer=4,
                       model_id="m", d_model=5, target="surprise",
                       model={"weight_processing": {"writing_weights_centered": True}, "weights_sha256": "x"})
    unit = d.export_vector()
    assert (unit["hook"], unit["layer"], unit["basis"]) == ("blocks.4.hook_resid_post", 4, "transformer_lens")
    np.testing.assert_allclose(unit["vector"].numpy(), d.direction, rtol=1e-6)
    np.testing.assert_allclose(d.export_vector("std")["vector"].numpy(), 3.0 * d.direction, rtol=1e-6)
    # TransformerLens with centred writing weights: resid_TL = resid_HF - mean over d_model.
    hf_residual = rng.normal(size=(7, 5)) + 2.0
    tl_residual = hf_residual - hf_residual.mean(1, keepdims=True)
    hf_vector = d.export_vector(basis="hf")["vector"].double().numpy()
    np.testing.assert_allclose(hf_residual @ hf_vector, tl_residual @ d.direction, rtol=1e-5, atol=1e-6)
    # Uncentred (RMSNorm models such as SmolLM2): the bases coincide.
    plain = ProbeDirection(d.direction, 0.0, 3.0, "h", 4, "m", 5, "surprise")
    np.testing.assert_allclose(plain.export_vector(basis="hf")["vector"].numpy(), d.direction, rtol=1e-6)
    with pytest.raises(ValueError, match="scale must be 'unit', 'std' or a number, got 'big'"):
        d.export_vector("big")
    with pytest.raises(ValueError, match="basis must be 'transformer_lens' or 'hf', got 'nnsight'"):
        d.export_vector(basis="nnsight")


@pytest.fixture(scope="module")
def tiny_probe(one_thread):
    model = tiny_model()
    run = capture(model, TINY_CORPUS * 3, progress=False)
    direction = fit_sweep(run, hooks=run.hooks[-1:], n_folds=3, n_shuffles=0, n_boot=10, nested=False,
                          progress=False).direction()
    return model, direction


def test_a_probe_records_the_model_basis_and_weights(tiny_probe, tmp_path):
    model, direction = tiny_probe
    loaded = ProbeDirection.load(direction.save(tmp_path / "probe"), model=model)
    expected = hashlib.sha256()  # reference: hashed here from the parameters, not by surprise_probe.core.models.basis
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = parameter.detach().contiguous()
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        expected.update(tensor.numpy().tobytes())
    assert loaded.model["weights_sha256"] == expected.hexdigest()
    processing = loaded.model["weight_processing"]
    # tiny_model: a LayerNorm HookedTransformer on TransformerLens 3.x, a random Llama bridge on 4.x
    expected = ("HookedTransformer", "LN") if hooked_transformer_available() else ("TransformerBridge", "RMS")
    assert (processing["backend"], processing["normalization_type"]) == expected
    # The tiny model is built unprocessed: its writing weights are not centred.
    assert float(model.W_E.detach().mean(-1).abs().max()) > 1e-3 and processing["writing_weights_centered"] is False


def test_a_probe_refuses_the_same_name_with_other_weights_or_processing(tiny_probe, tmp_path):
    model, direction = tiny_probe
    other = tiny_model(seed=1)
    other.cfg.model_name = model.cfg.model_name  # same name, other weights
    with pytest.raises(ValueError, match="same name, other weights: refit"):
        direction.check_model(other)
    centred = tiny_model()
    with torch.no_grad():
        centred.W_E.sub_(centred.W_E.mean(-1, keepdim=True))
        for block in centred.blocks:
            block.attn.W_O.sub_(block.attn.W_O.mean(-1, keepdim=True))
            block.mlp.W_out.sub_(block.mlp.W_out.mean(-1, keepdim=True))
    with pytest.raises(ValueError, match="writing_weights_centered=False but the given model .* has "
                                         "writing_weights_centered=True"):
        direction.check_model(centred)
    in_bf16 = tiny_model().to(torch.bfloat16)
    in_bf16.cfg.dtype = torch.bfloat16
    with pytest.warns(UserWarning, match="dtype or backend differs"):
        direction.check_model(in_bf16)


def test_load_refuses_another_model(sweep_and_data, tmp_path):
    d = sweep_and_data[0].direction()
    d.save(tmp_path / "probe")
    with pytest.raises(
        ValueError,
        match=r"fitted on model 'planted' \(d_model 6\) but the given model is 'other' \(d_model 6\)",
    ):
        ProbeDirection.load(tmp_path / "probe", model=_model("other"))
    with pytest.raises(ValueError, match=r"given model is 'planted' \(d_model 8\)"):
        ProbeDirection.load(tmp_path / "probe", model=_model(d_model=8))


def test_load_detects_a_mixed_up_pair(sweep_and_data, tmp_path):
    d = sweep_and_data[0].direction()
    d.save(tmp_path / "probe")
    safetensors.numpy.save_file({"direction": -d.direction}, str(tmp_path / "probe.safetensors"))
    with pytest.raises(ValueError, match="does not match the direction hash"):
        ProbeDirection.load(tmp_path / "probe")
    (tmp_path / "probe.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"probe\.safetensors does not exist"):
        ProbeDirection.load(tmp_path / "probe")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        ProbeDirection.load(tmp_path / "missing")


def test_direction_must_be_unit_and_match_d_model():
    with pytest.raises(ValueError, match="unit norm, got norm 2.0"):
        ProbeDirection(np.array([2.0, 0.0]), 0.0, 1.0, "h", 0, "m", 2, "surprise")
    with pytest.raises(ValueError, match=r"shape \(3,\) but d_model is 2"):
        ProbeDirection(np.ones(3) / np.sqrt(3), 0.0, 1.0, "h", 0, "m", 2, "surprise")


def _tiny_folder(tmp_path, tokenizer, architecture):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if architecture == "gpt2":  # LayerNorm: TransformerLens centres the writing weights
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf_model = GPT2LMHeadModel(config).eval()
    else:  # RMSNorm, like SmolLM2 and gemma: no centring
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf_model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so folding them changes the weights
        for name, parameter in hf_model.named_parameters():
            if "ln" in name or "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    folder = tmp_path / architecture
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, hf_model


@pytest.mark.parametrize("architecture, centred", [("gpt2", True), ("llama", False)])
def test_hf_basis_export_reads_the_hugging_face_hidden_states(tmp_path, tiny_tokenizer, one_thread,
                                                              architecture, centred):
    import surprise_probe as sp

    folder, hf_model = _tiny_folder(tmp_path, tiny_tokenizer, architecture)
    with warnings.catch_warnings():  # a tiny folder may load through the bridge (it says so)
        warnings.simplefilter("ignore")
        model = sp.load_model(str(folder), device="cpu", progress=False)
    fingerprint = model_fingerprint(model)
    processing = fingerprint["weight_processing"]
    assert processing["writing_weights_centered"] is centred and processing["unembed_centered"] is True
    assert processing["loader"] == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                                    "fold_value_biases": True}
    raw = np.random.default_rng(0).normal(size=32) + 0.5  # a direction with a mean component
    probe = ProbeDirection(raw / np.linalg.norm(raw), mean=0.0, std=1.0, hook="blocks.0.hook_resid_post", layer=0,
                           model_id=model_id(model), d_model=32, target="surprise", model=fingerprint)
    ids = torch.tensor([tiny_tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    _, cache = model.run_with_cache(ids, names_filter=probe.hook)
    toolkit = cache[probe.hook][0].double().numpy() @ probe.direction
    with torch.no_grad():  # reference: the Hugging Face model itself, output of decoder layer 0
        hidden = hf_model(ids, output_hidden_states=True).hidden_states[1][0].double().numpy()
    exported = probe.export_vector(basis="hf")
    assert exported["centred_for_hf"] is centred
    np.testing.assert_allclose(hidden @ exported["vector"].double().numpy(), toolkit, rtol=1e-4, atol=1e-4)
    if centred:  # the unedited direction would read the HF hidden states wrongly
        assert np.abs(hidden @ probe.direction - toolkit).max() > 1e-2


def test_a_probe_whose_hash_was_removed_is_refused_unless_allowed(sweep_and_data, tmp_path):
    """std x 100 with artifact_sha256 deleted was accepted: the hash was checked only when present."""
    meta = sweep_and_data[0].direction().save(tmp_path / "probe")
    info = json.loads(meta.read_text())
    info["std"] *= 100
    del info["artifact_sha256"]
    meta.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"probe\.json has no artifact hash \(artifact_sha256\), so an edited field"):
        ProbeDirection.load(meta)
    loaded = ProbeDirection.load(meta, allow_unverified=True)
    assert loaded.std == pytest.approx(info["std"])


SAVE_SCRIPT = """
import sys, numpy as np
from surprise_probe.probes import ProbeDirection
d = np.array([3.0, 4.0, 0.0, 0.0]) / 5
ProbeDirection(d, mean=0.5, std=2.0, hook="blocks.1.hook_resid_post", layer=1, model_id="m", d_model=4,
               target="surprise", metrics={"r2": 0.5, "alpha": 10.0}, versions={"numpy": "x"},
               model={"weights_sha256": "ab", "dtype": "float32"}).save(sys.argv[1])
"""


def test_identical_saves_give_identical_bytes_and_hashes(tmp_path):
    """safetensors wrote its metadata in hash-map order, different in every process, so identical
    runs recorded different probe sha256 in steer.json and patch.json."""
    import subprocess
    import sys

    from surprise_probe.interventions.experiments import probe_artifact

    for run in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / run / "probe")], check=True)
    for suffix in (".safetensors", ".json"):
        contents = {(tmp_path / run / f"probe{suffix}").read_bytes() for run in ("a", "b", "c")}
        assert len(contents) == 1, suffix
    hashes = {probe_artifact(tmp_path / run / "probe")["sha256"] for run in ("a", "b", "c")}
    assert len(hashes) == 1 and probe_artifact(tmp_path / "a" / "probe")["verified"] is True
    loaded = ProbeDirection.load(tmp_path / "a" / "probe")  # the canonical file reads back
    np.testing.assert_array_equal(loaded.direction, np.array([0.6, 0.8, 0.0, 0.0]))
    with safetensors.safe_open(str(tmp_path / "a" / "probe.safetensors"), "np") as handle:
        assert handle.metadata()["hook"] == "blocks.1.hook_resid_post"


def test_a_bf16_model_against_a_float32_probe_names_the_dtype_to_load_with():
    model = tiny_model().to(torch.bfloat16)
    model.cfg.dtype = torch.bfloat16
    fingerprint = model_fingerprint(tiny_model())  # measured on a float32 load
    fingerprint["weight_processing"]["writing_weights_centered"] = not \
        model_fingerprint(model)["weight_processing"]["writing_weights_centered"]
    direction = ProbeDirection(np.ones(model.cfg.d_model) / np.sqrt(model.cfg.d_model), 0.0, 1.0,
                               "blocks.1.hook_resid_post", 1, model_id(model), model.cfg.d_model, "surprise",
                               model=fingerprint)
    with pytest.raises(ValueError, match=r"fitted on a float32 load and this model is bfloat16 .*"
                                         r"dtype='float32' \(CLI: --dtype float32\) as for the fit"):
        direction.check_model(model)
