"""Attribution patching against exact patching and finite differences on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions.attribution import (
    attribution_patching,
    attribution_scatter_figure,
    direction_attribution,
    exact_direction_ablation,
    validate_attribution,
)
from surprise_probe.interventions.patching import activation_patching, align_positions

from surprise_probe.core.forward.edits import Patch, apply_all
from surprise_probe.core.forward.passes import forward
from surprise_probe.core.text.encoding import encode, pad_batch, pad_id
from tests.conftest import needs_hooked_transformer


def _conv(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


PAIRS = [
    (_conv("Hello world, how are you?", "The quick brown fox jumps over the lazy dog."),
     _conv("Hello world, how are you?", "A cat sat on the mat and looked at the moon.")),
    (_conv("Hi", "Rivers flow to the sea."), _conv("Hi", "Numbers like 12 appear.")),
    (_conv("Answer briefly.", "Mountains rise to the sky."), _conv("Answer briefly.", "Hello world, how are you today?")),
]


def _direction(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(64, generator=generator)
    return d / d.norm()


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def double_model(request, one_thread):
    """float64 copy of a tiny model, so finite differences are accurate to ~1e-8. On both backends:
    the gradients attribution needs must be there on TransformerLens 3.x and 4.x alike (the
    bridge once cached none, silently: TransformerLens issue #1680)."""
    from surprise_probe.testing import tiny_bridge, tiny_hooked_transformer

    if request.param == "hooked":
        needs_hooked_transformer()
        return tiny_hooked_transformer(seed=3).double()
    model = tiny_bridge(seed=3, dtype=torch.float64, initializer_range=0.3)  # far from uniform, like the other
    _exact_float64(model)
    return model


def _exact_float64(bridge) -> None:
    """Make a float64 bridge compute in float64 throughout, so central differences converge.

    Two steps of a float64 Hugging Face Llama round to float32: ``LlamaRMSNorm`` casts its input to
    float32, and the eager attention takes its softmax in float32 (the bridge's own attention does
    the same). Their rounding noise (~1e-7 relative) divided by eps = 1e-3 put the finite
    differences 1e-4 off whatever the method (found 2026-12-07; the error grew as eps shrank). The
    norms get the same formula in float64; the attention gets the fused kernel ``load_model`` uses.
    """
    from surprise_probe.core.models.attention import fuse_bridge_attention

    norms = [m for m in bridge.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]
    assert norms, "no Hugging Face RMSNorm found: this helper is out of date"
    for norm in norms:
        def forward(x, norm=norm):
            return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

        norm.forward = forward
    assert fuse_bridge_attention(bridge) == bridge.cfg.n_layers


def _entropy_mean(logits, positions) -> float:
    from surprise_probe.core.forward.metrics import output_entropy

    return float(output_entropy(logits[:, torch.as_tensor(positions)]).double().mean())


def test_pair_estimate_is_the_derivative_of_a_small_patch(double_model):
    """Patching a source moved only eps of the way from the destination changes the measured
    entropy by eps * estimate (first-order identity), checked with the Patch hook directly."""
    model, d = double_model, _direction(1)
    hook = "blocks.0.hook_resid_post"
    result = attribution_patching(model, PAIRS[:1], direction=d, hooks=[hook], groups=("response",), progress=False)
    src, dst = encode(model, PAIRS[0][0]), encode(model, PAIRS[0][1])
    dst_pos, src_pos = align_positions(src, dst, "response")
    pad = pad_id(model)
    batch = pad_batch([dst], pad)
    with torch.no_grad():
        _, source_acts = forward(model, pad_batch([src], pad), [hook])
        clean_logits, dest_acts = forward(model, batch, [hook])
    eps = 1e-3  # central differences: truncation error ~eps^2, rounding ~1e-8 / eps

    def patched_entropy(step: float) -> float:
        blended = dest_acts[hook].clone()
        blended[0, torch.as_tensor(dst_pos)] += step * (source_acts[hook][0, torch.as_tensor(src_pos)]
                                                       - dest_acts[hook][0, torch.as_tensor(dst_pos)])
        mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
        mask[0, torch.as_tensor(dst_pos)] = True
        index = torch.arange(batch.tokens.shape[1]).unsqueeze(0)  # blended is in destination positions
        patch = Patch(hooks=hook, positions=mask, source=blended, source_index=index, direction=d)
        with torch.no_grad(), apply_all(model, [patch]):
            return _entropy_mean(model(batch.tokens, return_type="logits"), dst_pos)

    finite_difference = (patched_entropy(eps) - patched_entropy(-eps)) / (2 * eps)
    estimate = result.estimate[0][0][0]
    assert abs(estimate) > 1e-3  # a real, non-zero effect
    assert abs(_entropy_mean(clean_logits, dst_pos) - result.entropy_destination[0]) < 1e-9
    assert finite_difference == pytest.approx(estimate, rel=1e-3, abs=1e-5)


def test_single_run_attribution_is_the_derivative_of_a_small_ablation(double_model):
    """H_t(clean) - H_t(x - eps <x,d> d) = eps * attribution[h, t] to first order, every t."""
    from surprise_probe.core.forward.metrics import output_entropy

    model, d = double_model, _direction(2)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    item = PAIRS[0][0]
    attribution = direction_attribution(model, item, d, hooks=hooks, chunk_size=5)
    batch = pad_batch([encode(model, item)], pad_id(model))
    eps = 1e-3  # central differences (see above)

    def shrink(step: float):  # independent of the Ablate class: the edit written out
        def hook_fn(activation, hook):
            return activation - step * (activation @ d.double()).unsqueeze(-1) * d.double()
        return hook_fn

    with torch.no_grad():
        for k, hook in enumerate(hooks):
            entropies = []
            for step in (-eps, eps):
                with model.hooks(fwd_hooks=[(hook, shrink(step))]):
                    entropies.append(output_entropy(model(batch.tokens, return_type="logits"))[0])
            finite_difference = ((entropies[0] - entropies[1]) / (2 * eps)).numpy()
            np.testing.assert_allclose(attribution[k], finite_difference, rtol=1e-3, atol=1e-5)
    assert np.abs(attribution).max() > 1e-4


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_estimate_tracks_exact_patching_on_random_models(backend, tiny_hooked, tiny_bridge_model, one_thread):
    model = tiny_hooked if backend == "hooked" else tiny_bridge_model
    result = validate_attribution(model, PAIRS, direction=_direction(0), progress=False)
    assert result.n_points == len(PAIRS) * 2 * 2
    assert result.pearson_r > 0.5
    low, high = result.pearson_r_ci
    assert low <= result.pearson_r <= high
    # exact values agree with activation_patching (an independent implementation), averaged over pairs
    reference = activation_patching(model, PAIRS, hooks=result.hooks, groups=result.groups, direction=_unit_probe(model),
                                    components=("direction",), n_boot=10, progress=False)
    moved = np.asarray(reference.entropy_patched["direction"]) - reference.entropy_destination
    np.testing.assert_allclose(np.asarray(result.exact).mean(0), moved, atol=2e-5)
    fig = attribution_scatter_figure(result)
    assert len(fig.data) == len(result.groups) + 1
    assert "Pearson r" in fig.layout.title.text


def _unit_probe(model):
    from surprise_probe.core.forward.directions import SteeringDirection

    return SteeringDirection(_direction(0), "blocks.0.hook_resid_post", 1.0)


def test_single_run_attribution_correlates_with_exact_ablation(tiny_hooked, one_thread):
    item = PAIRS[1][1]
    estimate = direction_attribution(tiny_hooked, item, _direction(4))
    exact = exact_direction_ablation(tiny_hooked, item, _direction(4))
    assert estimate.shape == exact.shape == (2, len(encode(tiny_hooked, item)))
    assert np.corrcoef(estimate.ravel(), exact.ravel())[0, 1] > 0.8


def test_targets_outside_the_sequence_are_refused(tiny_hooked):
    with pytest.raises(ValueError, match="target position 999 is outside"):
        direction_attribution(tiny_hooked, "Hello world.", _direction(), targets=[999])


def test_untouched_targets_stay_nan(tiny_hooked):
    attribution = direction_attribution(tiny_hooked, "Hello world, how are you?", _direction(), targets=[1, 3])
    assert np.isfinite(attribution[:, [1, 3]]).all()
    assert np.isnan(attribution[:, 0]).all() and np.isnan(attribution[:, 2]).all()
