"""Dose-response and ablation: batched strengths equal the one-strength loop; controls; clear errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from surprise_probe.interventions import (
    SteeringDirection,
    directional_ablation,
    dose_response,
    from_probe,
    orthogonal_direction,
    random_directions,
    run_sweep,
)

from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.encoding import encode_all
from surprise_probe.core.utils.stats import slope, zscore
from tests.conftest import CONVERSATION, TEXTS, random_steering

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
ITEMS = [CONVERSATION, TEXTS[0], TEXTS[3]]


def _steering(model, seed=0, std=1.5):
    return random_steering(model, seed, std, HOOK)


def _probe_like(model, **overrides):
    """A stand-in with the attributes of probes.ProbeDirection."""
    d = np.random.default_rng(0).normal(size=model.cfg.d_model)
    fields = dict(direction=d / np.linalg.norm(d), mean=0.0, std=2.0, hook=HOOK, layer=0,
                  model_id=model_id(model), d_model=model.cfg.d_model)
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("batch_size", [3, 64])
def test_batched_sweep_equals_one_strength_at_a_time(tiny_model, batch_size):
    strengths = [-4.0, 0.0, 2.0, 6.0]
    kwargs = dict(random_directions=2, batch_size=batch_size, progress=False, n_boot=50)
    batched = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, **kwargs)
    loop = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, batched=False, **kwargs)
    for key in ("entropy", "kl", "top1_agreement", "slopes"):
        np.testing.assert_allclose(getattr(batched, key), getattr(loop, key), atol=1e-5, rtol=0)
    assert batched.z_score == pytest.approx(loop.z_score, abs=1e-3)
    if batch_size == 64:  # all (direction, strength) rows of a sequence share one forward
        assert batched.n_forwards < loop.n_forwards


def test_strength_zero_is_the_clean_run_and_metrics_are_consistent(tiny_model):
    strengths = [-3.0, 0.0, 3.0]
    result = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, random_directions=4,
                           progress=False, n_boot=100)
    entropy, kl, agree = (np.asarray(x) for x in (result.entropy, result.kl, result.top1_agreement))
    zero = strengths.index(0.0)
    np.testing.assert_allclose(entropy[:, zero], result.clean_entropy, atol=1e-5)
    np.testing.assert_allclose(kl[:, zero], 0.0, atol=1e-5)
    np.testing.assert_allclose(agree[:, zero], 1.0)
    assert (kl[:, [0, 2]] > 0).all()
    assert result.labels[:2] == ["probe", "orthogonal"] and len(result.labels) == 6
    np.testing.assert_allclose(result.slopes, slope(strengths, entropy), atol=1e-9)
    assert result.probe_slope_ci[0] <= result.probe_slope <= result.probe_slope_ci[1]
    assert result.z_score == pytest.approx(zscore(result.slopes[0], np.asarray(result.slopes[2:])))
    n_scored = sum(int(e.scored.sum()) for e in encode_all(tiny_model, ITEMS))
    assert result.n_tokens == n_scored and result.n_sequences == 3


def test_sweep_matches_a_direct_computation(tiny_model):
    """Reference: steer one sequence by hand and compute entropy and KL over its scored span."""
    from surprise_probe.interventions import Steer

    from surprise_probe.core.forward.metrics import output_entropy
    from surprise_probe.core.text.encoding import pad_batch, pad_id

    direction = _steering(tiny_model)
    encoded = encode_all(tiny_model, [CONVERSATION])
    table = run_sweep(tiny_model, encoded, HOOK, direction.direction[None], [2.5], scale=direction.std,
                      progress=False)
    batch = pad_batch(encoded, pad_id(tiny_model))
    with torch.no_grad():
        clean = tiny_model(batch.tokens)[0][batch.scored[0]]
        with Steer(hooks=HOOK, direction=direction.direction, strength=2.5, scale=direction.std,
                   positions=batch.scored).apply(tiny_model):
            steered = tiny_model(batch.tokens)[0][batch.scored[0]]
    entropy = output_entropy(steered[None])[0].sum().item()
    p, q = torch.log_softmax(steered, -1), torch.log_softmax(clean, -1)
    kl = (p.exp() * (p - q)).sum().item()
    assert table.entropy[0, 0, 0] == pytest.approx(entropy, abs=1e-4)
    assert table.kl[0, 0, 0] == pytest.approx(kl, abs=1e-5)
    assert table.n_tokens[0] == int(batch.scored.sum())


def test_steering_positions_all_differs_from_response_only(tiny_model):
    direction = _steering(tiny_model)
    encoded = encode_all(tiny_model, [CONVERSATION])
    response = run_sweep(tiny_model, encoded, HOOK, direction.direction[None], [4.0], progress=False)
    everywhere = run_sweep(tiny_model, encoded, HOOK, direction.direction[None], [4.0], positions="all",
                           progress=False)
    assert response.kl[0, 0, 0] != pytest.approx(everywhere.kl[0, 0, 0], abs=1e-6)


def test_ablation_reports_entropy_change_against_controls(tiny_model):
    result = directional_ablation(tiny_model, ITEMS, _steering(tiny_model), random_directions=4,
                                  progress=False, n_boot=100)
    assert len(result.entropy_change) == 6
    assert result.probe_change_ci[0] <= result.entropy_change[0] <= result.probe_change_ci[1]
    assert all(k >= 0 for k in result.kl) and max(result.kl) > 0
    assert result.z_score == pytest.approx(zscore(result.entropy_change[0], np.asarray(result.entropy_change[2:])))


def test_control_directions_are_unit_seeded_and_orthogonal():
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    first, again = random_directions(64, 5, seed=3), random_directions(64, 5, seed=3)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(5))
    ortho = orthogonal_direction(d, seed=0)
    assert abs(float(ortho @ d)) < 1e-6 and float(ortho.norm()) == pytest.approx(1.0, abs=1e-6)


def test_probe_from_another_model_is_refused(tiny_model):
    with pytest.raises(ValueError, match="d_model=32"):
        from_probe(tiny_model, _probe_like(tiny_model, direction=np.ones(32), d_model=32))
    with pytest.raises(ValueError, match="'some-other-model'"):
        from_probe(tiny_model, _probe_like(tiny_model, model_id="some-other-model"))
    with pytest.raises(ValueError, match="blocks.7.hook_resid_post"):
        from_probe(tiny_model, _probe_like(tiny_model, hook="blocks.7.hook_resid_post"))
    direction = from_probe(tiny_model, _probe_like(tiny_model))
    assert direction.std == 2.0 and direction.hook == HOOK


def test_strength_that_overflows_is_named(tiny_model):
    # 1e38 x std 1.5 is finite in float32, but its square is not: every later layer norm divides by
    # infinity and each direction gave entropy ln V, a slope of ~1e-40 and z 0.00 without a word.
    for std in (1.5, 10.0):
        with pytest.raises(ValueError, match=r"strength=1e\+38 \(x std .*\) .*overflows float32, so every later "
                                             r"layer norm outputs zeros .*below 1\.84e\+19"):
            dose_response(tiny_model, ITEMS, _steering(tiny_model, std=std), [0.0, 1e38], random_directions=0,
                          progress=False)
    with pytest.raises(ValueError, match="finite"):
        dose_response(tiny_model, ITEMS, _steering(tiny_model), [0.0, float("inf")], progress=False)


@pytest.mark.parametrize("batched", [True, False])
def test_a_strength_that_saturates_the_model_is_named(tiny_hooked, batched):
    """Along (1, ..., 1) a LayerNorm model centres the edit away; at 1e9 rounding leaves nothing of the
    activation, so every output is uniform (entropy exactly ln V): an error, not a number."""
    d_model = tiny_hooked.cfg.d_model
    flat = SteeringDirection(torch.ones(d_model) / d_model**0.5, HOOK, 1.0)
    with pytest.raises(ValueError, match=r"strength=1e\+09 on direction 'probe' \(steer\) saturated the model on "
                                         r"input 0: its output is uniform \(entropy = ln 400"):
        dose_response(tiny_hooked, ITEMS, flat, [0.0, 1e9], random_directions=2, batched=batched, progress=False)
    assert dose_response(tiny_hooked, ITEMS, flat, [0.0, 1e3], random_directions=0, progress=False, n_boot=20)


def test_non_finite_logits_are_named(tiny_hooked):
    half = copy.deepcopy(tiny_hooked).to(torch.float16)
    half.cfg.dtype = torch.float16
    with pytest.raises(ValueError, match=r"strength=1e\+06 on direction 'probe' \(steer\) gave non-finite logits"):
        dose_response(half, ITEMS, _steering(half), [0.0, 1e6], random_directions=0, progress=False)


def test_input_without_scored_tokens_is_refused(tiny_model):
    item = {"token_ids": [1, 5, 6, 7], "scored": [False] * 4}
    with pytest.raises(ValueError, match="input 1 has no scored tokens"):
        dose_response(tiny_model, [TEXTS[0], item], _steering(tiny_model), [0.0, 1.0], progress=False)
