"""direction_attribution (forward mode on a HookedTransformer with resid_post hooks; otherwise
targets longest first, chunks cut to their longest row, logits only at the targets) against the
straightforward computation: one full-sequence forward with full logits and one backward per
target token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions.attribution import direction_attribution

from surprise_probe.core.text.encoding import encode

pytestmark = pytest.mark.usefixtures("one_thread")

ITEM = [{"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "A cat sat on the mat."}]
RESID_POST = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
MIXED = ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]  # not all resid_post: the backward path


def _reference(model, tokens: torch.Tensor, d: torch.Tensor, targets, hooks) -> np.ndarray:
    out = np.full((len(hooks), tokens.shape[1]), np.nan)
    for t in targets:
        stored = {}

        def keep(name, stored=stored):
            def hook_fn(activation, hook):
                activation = activation if activation.requires_grad else activation.detach().requires_grad_(True)
                stored.setdefault(name, activation)
                return activation
            return hook_fn

        with torch.enable_grad(), model.hooks(fwd_hooks=[(h, keep(h)) for h in hooks]):
            logits = model(tokens, return_type="logits")
            log_p = torch.log_softmax(logits[0, t].double(), dim=-1)
            entropy = -(log_p.exp() * log_p).sum()
            grads = torch.autograd.grad(entropy, [stored[h] for h in hooks])
        for k, h in enumerate(hooks):
            x = stored[h].detach()[0].double() @ d.double()
            g = grads[k][0].double() @ d.double()
            out[k, t] = float((x * g).sum())
    return out


@pytest.mark.parametrize(("chunk_size", "hooks"), [(8, RESID_POST), (1, MIXED), (3, MIXED), (64, MIXED)])
def test_direction_attribution_matches_one_full_backward_per_target(any_model, chunk_size, hooks):
    tiny_model = any_model
    d = torch.randn(int(tiny_model.cfg.d_model), generator=torch.Generator().manual_seed(7))
    d = d / d.norm()
    encoded = encode(tiny_model, ITEM)
    n = len(encoded)
    targets = [n - 1, 0, 3, n // 2, 1, n - 2]  # unsorted, both ends
    got = direction_attribution(tiny_model, encoded, d, hooks=hooks, targets=targets, chunk_size=chunk_size)
    want = _reference(tiny_model, torch.as_tensor(encoded.token_ids).unsqueeze(0), d, targets, hooks)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # untouched positions stay NaN
    np.testing.assert_allclose(got[:, targets], want[:, targets], rtol=1e-4, atol=1e-6)
    assert np.abs(want[:, targets]).max() > 1e-4  # a real signal, not zeros on both sides


def test_without_forward_mode_the_backward_path_gives_the_same(tiny_hooked, monkeypatch):
    """An operation without a forward-mode formula falls back to one backward per target."""
    from surprise_probe.interventions import attribution

    d = torch.randn(int(tiny_hooked.cfg.d_model), generator=torch.Generator().manual_seed(8))
    encoded = encode(tiny_hooked, ITEM)
    forward_mode = direction_attribution(tiny_hooked, encoded, d, hooks=RESID_POST)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(attribution, "_forward_mode_attribution", unsupported)
    backward = direction_attribution(tiny_hooked, encoded, d, hooks=RESID_POST, chunk_size=4)
    want = _reference(tiny_hooked, torch.as_tensor(encoded.token_ids).unsqueeze(0), d / d.norm(),
                      range(len(encoded)), RESID_POST)
    np.testing.assert_allclose(backward, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(forward_mode, want, rtol=1e-4, atol=1e-6)
