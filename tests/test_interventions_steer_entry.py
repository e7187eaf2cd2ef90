"""``with direction.steer(model, strength): model(tokens)``: the one-line steering entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.probes import ProbeDirection

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.0.hook_resid_post"


def _direction(model, std=1.5):
    rng = np.random.default_rng(3)
    d = rng.normal(size=model.cfg.d_model)
    return ProbeDirection(d / np.linalg.norm(d), mean=0.0, std=std, hook=HOOK, layer=0,
                          model_id=model.cfg.model_name, d_model=model.cfg.d_model, target="surprise")


def test_steer_equals_adding_strength_std_d_by_hand(tiny_hooked):
    direction = _direction(tiny_hooked)
    tokens = tiny_hooked.to_tokens(["The cat sat on the mat.", "Rain fell."])  # padded batch of ids
    d = torch.as_tensor(direction.direction, dtype=torch.float32)

    def by_hand(activation, hook):  # noqa: ARG001 - TransformerLens hook signature
        return activation + 3.0 * 1.5 * d

    with torch.no_grad():
        expected = tiny_hooked.run_with_hooks(tokens, fwd_hooks=[(HOOK, by_hand)])
        with direction.steer(tiny_hooked, 3.0) as touched:
            steered = tiny_hooked(tokens)
        clean = tiny_hooked(tokens)
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    assert touched.mask(HOOK).all()  # every position of both rows
    # the hook is gone after the block
    assert not torch.allclose(clean, steered) and not tiny_hooked.hook_dict[HOOK].fwd_hooks


def test_steer_at_some_positions_and_refuses_another_model(tiny_hooked):
    direction = _direction(tiny_hooked)
    tokens = tiny_hooked.to_tokens("Hello world")
    with torch.no_grad(), direction.steer(tiny_hooked, -2.0, positions=[-1]) as touched:
        tiny_hooked(tokens)
    assert touched.entries() == [(0, tokens.shape[1] - 1)]
    other = ProbeDirection(direction.direction, mean=0.0, std=1.0, hook=HOOK, layer=0, model_id="gpt2",
                           d_model=tiny_hooked.cfg.d_model, target="surprise")
    with pytest.raises(ValueError, match="fitted on model 'gpt2'"):
        other.steer(tiny_hooked, 1.0)
