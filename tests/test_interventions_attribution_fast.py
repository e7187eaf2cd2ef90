"""direction_attribution (forward mode with resid_post hooks, on a HookedTransformer or a bridge; otherwise
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


@pytest.fixture(params=["hooked", "bridge", "fused-bridge", "llama"])
def attributed_model(request):
    """The models of ``any_model`` plus a bridge with the fused attention ``load_model`` gives every
    bridge (whose default CPU kernel has no forward-mode formula)."""
    from surprise_probe.core.models.attention import fuse_bridge_attention
    from surprise_probe.testing import tiny_bridge

    if request.param != "fused-bridge":
        return request.getfixturevalue({"hooked": "tiny_hooked", "bridge": "tiny_bridge_model",
                                        "llama": "tiny_llama"}[request.param])
    model = tiny_bridge()
    assert fuse_bridge_attention(model) == model.cfg.n_layers
    return model


@pytest.mark.parametrize("runs_forward_mode", [True, False], ids=["forward-mode", "backward-fallback"])
def test_forward_mode_and_its_fallback_give_the_reference(attributed_model, runs_forward_mode, monkeypatch):
    """resid_post hooks run forward mode on every backend (a bridge starts at the block with
    ``bridge_from_layer``); an operation without a forward-mode formula falls back to one backward
    per chunk of targets. Both equal the reference, and the spy fails the test if forward mode does
    not run to its end where it should (a NotImplementedError inside it would fall back silently)."""
    from surprise_probe.interventions import attribution

    any_model = attributed_model
    calls = []
    real = attribution._forward_mode_attribution

    def spy(*args, **kwargs):
        if not runs_forward_mode:
            calls.append("fell back")
            raise NotImplementedError("Trying to use forward AD with an op that does not support it")
        real(*args, **kwargs)
        calls.append("ran")

    monkeypatch.setattr(attribution, "_forward_mode_attribution", spy)
    d = torch.randn(int(any_model.cfg.d_model), generator=torch.Generator().manual_seed(8))
    encoded = encode(any_model, ITEM)
    got = direction_attribution(any_model, encoded, d, hooks=RESID_POST, chunk_size=4)
    assert calls == (["ran"] if runs_forward_mode else ["fell back"])
    want = _reference(any_model, torch.as_tensor(encoded.token_ids).unsqueeze(0), d / d.norm(),
                      range(len(encoded)), RESID_POST)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.abs(want).max() > 1e-4
