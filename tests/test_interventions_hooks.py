"""Hooks: what each intervention writes, where, exactly once, and that no hook outlives its block."""

from __future__ import annotations

import pytest
import torch
from surprise_probe.interventions import Ablate, Clamp, Patch, Steer, apply_all, resid_hooks

from surprise_probe.core.text.encoding import encode_all, pad_batch, pad_id

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14]])


def _direction(d_model: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def _activation_after(model, interventions, tokens=TOKENS, hook=HOOK, **kwargs):
    """The activation at ``hook`` as seen after the interventions (a recorder added last)."""
    seen = {}

    def record(activation, hook):  # noqa: ARG001
        seen.setdefault("value", activation.detach().clone())

    with torch.no_grad(), apply_all(model, interventions):
        model.run_with_hooks(tokens, fwd_hooks=[(hook, record)], **kwargs)
    return seen["value"]


def _no_hooks_left(model) -> bool:
    return all(len(point.fwd_hooks) == 0 and len(point.bwd_hooks) == 0 for point in model.hook_dict.values())


def test_steer_adds_strength_sigma_d_exactly_once_at_chosen_positions(tiny_model):
    d = _direction(tiny_model.cfg.d_model)
    unit = d / d.norm()
    clean = _activation_after(tiny_model, [])
    steer = Steer(hooks=HOOK, direction=d, strength=3.0, scale=0.5, positions=[1, -1])
    steered = _activation_after(tiny_model, [steer])
    delta = steered - clean
    torch.testing.assert_close(delta[:, [1, 5]], (1.5 * unit).expand(2, 2, -1), atol=1e-5, rtol=0)
    assert delta[:, [0, 2, 3, 4]].abs().max() == 0
    with steer.apply(tiny_model) as touched, torch.no_grad():
        tiny_model(TOKENS)
    assert touched.entries() == [(0, 1), (0, 5), (1, 1), (1, 5)]
    assert touched.hooks == [HOOK]


def test_per_row_strength_matches_rows_run_alone(tiny_model):
    d = _direction(tiny_model.cfg.d_model, 1)
    strengths = torch.tensor([-2.0, 4.0])
    together = _activation_after(tiny_model, [Steer(hooks=HOOK, direction=d, strength=strengths)])
    with torch.no_grad():
        for row in range(2):
            with Steer(hooks=HOOK, direction=d, strength=float(strengths[row])).apply(tiny_model):
                alone = tiny_model(TOKENS[row : row + 1])
            with Steer(hooks=HOOK, direction=d, strength=strengths).apply(tiny_model):
                batched = tiny_model(TOKENS)[row : row + 1]
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    clean = _activation_after(tiny_model, [])
    unit = d / d.norm()
    torch.testing.assert_close((together - clean)[1, 3], 4.0 * unit, atol=1e-5, rtol=0)


def test_per_row_directions(tiny_model):
    d_model = tiny_model.cfg.d_model
    directions = torch.stack([_direction(d_model, 2), _direction(d_model, 3)])
    clean = _activation_after(tiny_model, [])
    steered = _activation_after(tiny_model, [Steer(hooks=HOOK, direction=directions, strength=1.0)])
    for row in range(2):
        unit = directions[row] / directions[row].norm()
        torch.testing.assert_close((steered - clean)[row, 2], unit, atol=1e-5, rtol=0)


def test_clamp_sets_projection_and_ablate_removes_it(tiny_model):
    d = _direction(tiny_model.cfg.d_model, 4)
    unit = d / d.norm()
    clamped = _activation_after(tiny_model, [Clamp(hooks=HOOK, direction=d, value=torch.tensor([2.5, -1.0]))])
    torch.testing.assert_close(clamped[0] @ unit, torch.full((6,), 2.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(clamped[1] @ unit, torch.full((6,), -1.0), atol=1e-4, rtol=0)
    clean = _activation_after(tiny_model, [])
    ablated = _activation_after(tiny_model, [Ablate(hooks=HOOK, direction=d, positions=slice(2, None))])
    assert (ablated[:, 2:] @ unit).abs().max() < 1e-4
    torch.testing.assert_close(ablated[:, :2], clean[:, :2])
    half = _activation_after(tiny_model, [Ablate(hooks=HOOK, direction=d, fraction=0.5)])
    torch.testing.assert_close(half @ unit, 0.5 * (clean @ unit), atol=1e-4, rtol=0)
    # the component orthogonal to d is untouched
    rest = clean - (clean @ unit).unsqueeze(-1) * unit
    torch.testing.assert_close(ablated[:, 2:], rest[:, 2:], atol=1e-4, rtol=0)


def test_scored_mask_positions_are_exactly_the_response(tiny_model):
    from tests.conftest import CONVERSATION

    encoded = encode_all(tiny_model, [CONVERSATION, "Hello world, how are you today?"])
    batch = pad_batch(encoded, pad_id(tiny_model))
    steer = Steer(hooks=HOOK, direction=_direction(tiny_model.cfg.d_model), strength=1.0, positions=batch.scored)
    with steer.apply(tiny_model) as touched, torch.no_grad():
        tiny_model(batch.tokens, attention_mask=batch.attention_mask)
    assert torch.equal(touched.mask(HOOK), batch.scored)
    assert len(touched.entries()) == int(batch.scored.sum())


def test_no_hook_survives_the_block_or_an_exception(tiny_model):
    d = _direction(tiny_model.cfg.d_model)
    steer = Steer(hooks=[HOOK, "blocks.0.hook_resid_post"], direction=d, strength=50.0)
    with torch.no_grad():
        clean = tiny_model(TOKENS)
        with steer.apply(tiny_model):
            assert not _no_hooks_left(tiny_model)
            steered = tiny_model(TOKENS)
        assert _no_hooks_left(tiny_model)
        assert not torch.allclose(clean, steered)
        with pytest.raises(RuntimeError, match="boom"), steer.apply(tiny_model):
            tiny_model(TOKENS)
            raise RuntimeError("boom")
        assert _no_hooks_left(tiny_model)
        # an error raised inside a hook (batch mismatch) also leaves nothing behind
        bad = Steer(hooks=HOOK, direction=d, strength=torch.ones(3))
        with pytest.raises(ValueError, match="strength has 3 rows but the activation batch has 2"), bad.apply(tiny_model):
            tiny_model(TOKENS)
        assert _no_hooks_left(tiny_model)
        torch.testing.assert_close(tiny_model(TOKENS), clean)


def test_patch_whole_activation_at_last_layer_copies_source_logits(tiny_model):
    last = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
    source_tokens = torch.tensor([[1, 20, 21, 22, 23, 24, 25]])
    stored = {}

    def keep(activation, hook):  # noqa: ARG001
        stored.setdefault("source", activation.detach().clone())

    with torch.no_grad():
        source_logits = tiny_model.run_with_hooks(source_tokens, fwd_hooks=[(last, keep)])
        mask = torch.tensor([[False, False, True, True, False, False]])
        index = torch.tensor([[0, 0, 5, 6, 0, 0]])  # destination 2, 3 <- source 5, 6
        patch = Patch(hooks=last, positions=mask, source=stored["source"], source_index=index)
        with patch.apply(tiny_model) as touched:
            patched = tiny_model(TOKENS[:1])
        clean = tiny_model(TOKENS[:1])
    torch.testing.assert_close(patched[0, 2:4], source_logits[0, 5:7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patched[0, :2], clean[0, :2])
    assert touched.entries() == [(0, 2), (0, 3)]


def test_bad_hooks_positions_and_directions_are_named(tiny_model):
    n_layers = tiny_model.cfg.n_layers
    with pytest.raises(ValueError, match=f"layer {n_layers + 3} is out of range"):
        resid_hooks(tiny_model, [n_layers + 3])
    d = _direction(tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"), Steer(hooks="blocks.9.hook_resid_post", direction=d).apply(tiny_model):
        pass
    with pytest.raises(ValueError, match="non-zero"):
        Steer(hooks=HOOK, direction=torch.zeros(tiny_model.cfg.d_model))
    with pytest.raises(ValueError, match="strength must be finite, got nan"):
        Steer(hooks=HOOK, direction=d, strength=float("nan"))
    with torch.no_grad():
        with pytest.raises(ValueError, match="position 9 is outside the sequence of 6"), Steer(hooks=HOOK, direction=d, positions=[9]).apply(tiny_model):
            tiny_model(TOKENS)
        with pytest.raises(ValueError, match=r"position mask has shape \(2, 4\)"), Steer(
            hooks=HOOK, direction=d, positions=torch.ones(2, 4, dtype=torch.bool)
        ).apply(tiny_model):
            tiny_model(TOKENS)


def test_fan_out_equals_replicated_rows_and_needs_one_sequence(tiny_model):
    d = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(9))
    strengths = torch.tensor([0.0, 2.0, -5.0])
    with torch.no_grad():
        with Steer(hooks=HOOK, direction=d, strength=strengths, fan_out=3).apply(tiny_model) as touched:
            fanned = tiny_model(TOKENS[:1])
        with Steer(hooks=HOOK, direction=d, strength=strengths).apply(tiny_model):
            replicated = tiny_model(TOKENS[:1].repeat(3, 1))
        torch.testing.assert_close(fanned, replicated, atol=1e-5, rtol=1e-5)
        assert touched.mask().shape == (3, TOKENS.shape[1])
        with pytest.raises(ValueError, match="fan_out=3 needs a batch of one sequence"), Steer(
            hooks=HOOK, direction=d, strength=strengths, fan_out=3
        ).apply(tiny_model):
            tiny_model(TOKENS)
    with pytest.raises(ValueError, match="needs exactly one hook"):
        Steer(hooks=[HOOK, "blocks.0.hook_resid_post"], direction=d[0], fan_out=2)
