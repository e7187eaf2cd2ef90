"""Probe directions: activation-space mapping, save/load roundtrip, refusal of other models."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from surprise_probe.probes import ArrayCapture, ProbeDirection, RidgeProbe, fit_sweep


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
    assert meta == tmp_path / "probe.json" and (tmp_path / "probe.npz").exists()
    info = json.loads(meta.read_text())
    assert {"model_id", "hook", "layer", "target", "data_hash", "metrics", "versions"} <= set(info)
    for path in (tmp_path / "probe", tmp_path / "probe.npz", tmp_path / "probe.json"):
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
    np.savez(tmp_path / "probe.npz", direction=-d.direction)
    with pytest.raises(ValueError, match="does not match the direction hash"):
        ProbeDirection.load(tmp_path / "probe")
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        ProbeDirection.load(tmp_path / "missing")


def test_direction_must_be_unit_and_match_d_model():
    with pytest.raises(ValueError, match="unit norm, got norm 2.0"):
        ProbeDirection(np.array([2.0, 0.0]), 0.0, 1.0, "h", 0, "m", 2, "surprise")
    with pytest.raises(ValueError, match=r"shape \(3,\) but d_model is 2"):
        ProbeDirection(np.ones(3) / np.sqrt(3), 0.0, 1.0, "h", 0, "m", 2, "surprise")
