"""Surprise or the norm? (issue #27): answers known by construction on tiny seeded models.

A direction planted in the unembedding's exact null space has no direct path to the logits: with
the final norm frozen it leaves entropy unchanged, while left free it still moves entropy through
the norm. Freezing at the clean value and mean-ablating neurons that write nothing are identities.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from surprise_probe.interventions import SteeringDirection
from surprise_probe.interventions.norm_control import MODES, norm_control
from surprise_probe.interventions.null_space import (
    entropy_neurons,
    null_space_share,
    unembedding_null_space,
)
from surprise_probe.interventions.plots import norm_control_figure

from surprise_probe.core.forward.edits import Replace
from surprise_probe.core.forward.hooks import (
    FINAL_NORM_SCALE,
    mlp_post,
    norm_scale_hooks,
    resid_post,
)
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.loading import load_model
from surprise_probe.testing import tiny_bridge, tiny_hooked_transformer

from .conftest import needs_hooked_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["A cat sat on the mat.", "Hello world, how are you today?", "Rivers flow to the sea."]
KINDS = ["hooked", "llama", "bridge"]


@pytest.fixture(params=KINDS)
def fresh_model(request, tiny_tokenizer, tiny_hf_folder):
    """A model of each kind whose weights a test may change: a LayerNorm HookedTransformer, a Llama
    as ``load_model`` loads it (RMSNorm folded: ``RMSPre`` on TransformerLens 3.x) and a bridge."""
    if request.param == "hooked":
        needs_hooked_transformer()
        model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, seed=3)
        with torch.no_grad():
            model.W_U.mul_(4.0)  # sharper next-token distributions than the random init gives
        return model
    if request.param == "llama":
        return load_model(str(tiny_hf_folder))
    return tiny_bridge(initializer_range=0.3)


def _null_vector(model, seed: int = 0) -> torch.Tensor:
    """A seeded unit vector orthogonal to the all-ones direction (which a LayerNorm removes)."""
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = d - d.mean()
    return (d / d.norm()).float()


def _plant_null_direction(model, u: torch.Tensor) -> None:
    """Make ``u`` an exact null direction of the unembedding: ``W_U <- (I - u u^T) W_U``."""
    with torch.no_grad():
        weight = model.W_U  # a parameter, or on a bridge a view of the lm_head weight
        weight.copy_(weight - u[:, None] * (u @ weight)[None])
    assert float((u @ model.W_U.detach()).abs().max()) < 1e-5


def _logits(model, tokens, interventions=()):
    from surprise_probe.core.forward.edits import apply_all

    with torch.no_grad(), apply_all(model, list(interventions)):
        return model(tokens, return_type="logits")


def test_freezing_every_norm_at_its_clean_value_is_the_identity(fresh_model):
    tokens = fresh_model.to_tokens(TEXTS[0])
    hooks = norm_scale_hooks(fresh_model)
    assert hooks[-1] == FINAL_NORM_SCALE and len(hooks) == 2 * int(fresh_model.cfg.n_layers) + 1
    _, cache = fresh_model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    clean = _logits(fresh_model, tokens)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        frozen = _logits(fresh_model, tokens, [Replace(hooks=hooks, value={h: cache[h] for h in hooks})])
    # A bridge computes an edited norm as x / scale instead of HF's x * rsqrt(variance): the same
    # numbers to float32 rounding (relative to the logits' size), not bit for bit.
    atol = 1e-6 if is_hooked_transformer(fresh_model) else 1e-6 * float(clean.abs().max()) * 4
    torch.testing.assert_close(frozen, clean, atol=atol, rtol=0)


def test_a_null_direction_has_no_direct_effect_but_a_total_one(fresh_model):
    u = _null_vector(fresh_model, seed=11)  # not seed 0: the first random control direction is seed 0's
    _plant_null_direction(fresh_model, u)
    last = resid_post(int(fresh_model.cfg.n_layers) - 1)  # the input of ln_final
    # std 5: steps large against every model's residual norm, so the norm (and entropy) moves
    result = norm_control(fresh_model, SteeringDirection(u, last, 5.0), TEXTS, strengths=[0.0, 2.0, 4.0],
                          n_random=2, n_neurons=0, n_boot=20, progress=False)
    frozen, total = result.effects["final_norm_frozen"], result.effects["total"]
    assert result.frozen_hooks["later_norms_frozen"] == [FINAL_NORM_SCALE]  # nothing else after the last block
    # direct effect: entropy unchanged at every strength, slope 0
    assert max(abs(h - result.clean_entropy) for h in frozen["entropy"]) < 1e-5
    assert abs(frozen["probe_slope"]) < 1e-5
    # total effect: the norm grows with the strength, the logits are divided by it, entropy moves
    assert max(abs(h - result.clean_entropy) for h in total["entropy"]) > 1e-3
    assert abs(total["probe_slope"]) > 1e-3
    assert result.norm_change["final_scale"]["probe_slope"] > 0
    assert abs(result.direct_share["final_norm_frozen"]["value"]) < 1e-3
    # random directions are read directly: their frozen slopes are not all zero
    assert max(abs(v) for v in frozen["random_slopes"]) > 1e-5
    # geometry: the planted direction is the null space (k = 1 of d_model 64)
    assert result.geometry["null_space"]["k"] == 1
    assert result.geometry["probe"]["null_share"] == pytest.approx(1.0, abs=1e-6)
    assert result.geometry["random"]["null_share_mean"] < 0.5


def test_null_space_share_is_one_inside_and_zero_orthogonal(fresh_model):
    u = _null_vector(fresh_model, seed=1)
    _plant_null_direction(fresh_model, u)
    null = unembedding_null_space(fresh_model, k=1)
    other = torch.randn(fresh_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    other = other - (other @ u) * u  # orthogonal to the null space
    assert float(null.share(u)) == pytest.approx(1.0, abs=1e-6)
    assert float(null.share(3.0 * u)) == pytest.approx(1.0, abs=1e-6)
    assert float(null.share(other)) == pytest.approx(0.0, abs=1e-6)
    assert null.expected_random_share == pytest.approx(1 / fresh_model.cfg.d_model)
    basis = torch.eye(6, dtype=torch.float64)[:, :2]
    assert null_space_share(torch.tensor([1.0, 1.0, 0, 0, 0, 0]), basis).item() == pytest.approx(1.0)
    assert null_space_share(torch.tensor([0, 0, 1.0, 0, 0, 0]), basis).item() == pytest.approx(0.0)


def test_the_finder_returns_a_planted_entropy_neuron(fresh_model):
    u = _null_vector(fresh_model, seed=2)
    _plant_null_direction(fresh_model, u)
    layer = int(fresh_model.cfg.n_layers) - 1
    with torch.no_grad():
        w_out = fresh_model.blocks[layer].mlp.W_out
        w_out[7].copy_(5.0 * w_out.norm(dim=-1).max() * u)  # the largest row, entirely in the null space
    null = unembedding_null_space(fresh_model, k=1)
    found = entropy_neurons(fresh_model, null, n_neurons=3)
    assert (found[0].layer, found[0].index) == (layer, 7)
    assert found[0].share == pytest.approx(1.0, abs=1e-6)
    assert found[0].norm_z > 3 and found[0].share_z > 3
    assert found[1].score < found[0].score / 10


def test_mean_ablating_neurons_that_write_nothing_changes_nothing(fresh_model):
    layer = int(fresh_model.cfg.n_layers) - 1
    with torch.no_grad():
        fresh_model.blocks[layer].mlp.W_out.zero_()
    tokens = fresh_model.to_tokens(TEXTS[1])
    _, cache = fresh_model.run_with_cache(tokens, names_filter=mlp_post(layer))
    mean = cache[mlp_post(layer)][0].mean(0)
    every = torch.ones(int(fresh_model.cfg.d_mlp), dtype=torch.bool)
    ablated = _logits(fresh_model, tokens, [Replace(hooks=mlp_post(layer), value=mean, units=every)])
    torch.testing.assert_close(ablated, _logits(fresh_model, tokens), atol=1e-6, rtol=0)
    # through the experiment: the steering slope all remains with the neurons ablated
    d = SteeringDirection(_null_vector(fresh_model, seed=4), resid_post(0), 1.0)
    result = norm_control(fresh_model, d, TEXTS, strengths=[-2.0, 0.0, 2.0], n_random=2,
                          n_neurons=int(fresh_model.cfg.d_mlp), n_random_neurons=0, n_boot=20, progress=False)
    assert result.mediation["remaining"] == pytest.approx(1.0, abs=1e-4)


def test_replace_edits_only_the_chosen_rows_and_units(tiny_hooked):
    tokens = torch.tensor([[1, 5, 6, 7]])
    hook = mlp_post(1)
    _, cache = tiny_hooked.run_with_cache(tokens, names_filter=hook)
    width = int(tiny_hooked.cfg.d_mlp)
    units = torch.zeros(2, width, dtype=torch.bool)
    units[1, :3] = True
    seen = {}

    def record(activation, hook):  # noqa: ARG001
        seen["value"] = activation.detach().clone()

    from surprise_probe.core.forward.edits import apply_all

    two = tokens.expand(2, -1)
    with torch.no_grad(), apply_all(tiny_hooked, [Replace(hooks=hook, value=torch.full((width,), 9.0), units=units)]):
        tiny_hooked.run_with_hooks(two, fwd_hooks=[(hook, record)])
    after = seen["value"]
    assert torch.equal(after[0], cache[hook][0])
    assert bool((after[1, :, :3] == 9.0).all()) and torch.equal(after[1, :, 3:], cache[hook][0, :, 3:])
    with pytest.raises(ValueError, match="no value for hook"):
        Replace(hooks=["a", "b"], value={"a": torch.zeros(1)})


def test_later_norms_are_those_after_the_steered_hook(tiny_tokenizer):
    needs_hooked_transformer()
    model = tiny_hooked_transformer(n_layers=3, tokenizer=tiny_tokenizer)
    assert norm_scale_hooks(model, after="blocks.1.hook_resid_post") == [
        "blocks.2.ln1.hook_scale", "blocks.2.ln2.hook_scale", FINAL_NORM_SCALE]
    assert norm_scale_hooks(model, after="blocks.1.hook_resid_mid") == [
        "blocks.1.ln2.hook_scale", "blocks.2.ln1.hook_scale", "blocks.2.ln2.hook_scale", FINAL_NORM_SCALE]
    assert norm_scale_hooks(model, after="blocks.1.hook_resid_pre")[0] == "blocks.1.ln1.hook_scale"


def test_a_model_without_a_final_norm_scale_is_refused(tiny_tokenizer):
    needs_hooked_transformer()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16,
                                  d_vocab=len(tiny_tokenizer), act_fn="gelu", normalization_type=None,
                                  model_name="no-norm")
    model = HookedTransformer(cfg, tiny_tokenizer)
    d = SteeringDirection(torch.ones(16), resid_post(0), 1.0)
    with pytest.raises(ValueError, match=r"no 'ln_final.hook_scale' hook \(normalization_type=None\)"):
        norm_control(model, d, TEXTS[:1], progress=False)


def test_the_result_saves_json_and_a_figure_and_shows_in_a_notebook(tiny_hooked, tmp_path):
    d = SteeringDirection(_null_vector(tiny_hooked, seed=6), resid_post(0), 1.0)
    entropy = SteeringDirection(_null_vector(tiny_hooked, seed=7), resid_post(1), 1.0, "entropy")
    result = norm_control(tiny_hooked, d, TEXTS, strengths=[-1.0, 0.0, 1.0], n_random=3, entropy_direction=entropy,
                          n_neurons=2, n_random_neurons=2, n_boot=20, progress=False)
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {"effects", "direct_share", "norm_change", "geometry", "entropy_neurons", "mediation", "warnings",
            "frozen_hooks", "n_sequences", "n_tokens"} <= set(data)
    assert set(data["effects"]) == set(MODES)
    assert len(data["effects"]["total"]["random_slopes"]) == 3 and len(data["mediation"]["random_remaining"]) == 2
    assert data["geometry"]["entropy_probe"]["hook"] == resid_post(1)
    assert [n["layer"] for n in data["entropy_neurons"]] == [1, 1]
    assert paths["html"].stat().st_size > 10_000
    assert "NormControlResult" in result._repr_html_() and "final norm frozen" in repr(result)
    assert any("random directions" in note for note in result.warnings)  # 3 < 10: said so
    assert len(norm_control_figure(data).data) > 6


def test_the_batched_rows_equal_one_forward_per_condition(tiny_tokenizer):
    """Reference: each condition in its own forward (Steer, then Replace of the clean scales)."""
    needs_hooked_transformer()
    model = tiny_hooked_transformer(n_layers=3, tokenizer=tiny_tokenizer, seed=5)
    with torch.no_grad():
        model.W_U.mul_(4.0)
    d = SteeringDirection(_null_vector(model, seed=8), resid_post(0), 2.0)
    result = norm_control(model, d, TEXTS, strengths=[-2.0, 0.0, 1.0], n_random=2, n_neurons=0, n_boot=20,
                          progress=False)
    from surprise_probe.core.forward.edits import Steer

    def mean_entropy(logits):
        log_probs = torch.log_softmax(logits[0].double(), -1)
        return -(log_probs.exp() * log_probs).sum(-1)

    later = norm_scale_hooks(model, after=d.hook)
    frozen = {"total": [], "final_norm_frozen": [FINAL_NORM_SCALE], "later_norms_frozen": later}
    for j, strength in enumerate([-2.0, 0.0, 1.0]):
        for mode, hooks in frozen.items():
            total = 0.0
            for text in TEXTS:
                tokens = model.to_tokens(text)
                _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in later)
                edits = [Steer(hooks=d.hook, direction=d.direction, strength=strength, scale=d.std)]
                if hooks:
                    edits.append(Replace(hooks=hooks, value={h: cache[h] for h in hooks}))
                total += float(mean_entropy(_logits(model, tokens, edits)).sum())
            assert result.effects[mode]["entropy"][j] == pytest.approx(total / result.n_tokens, abs=1e-5), (mode, j)
    assert result.clean_entropy == pytest.approx(result.effects["total"]["entropy"][1], abs=1e-12)
