"""The fused attention (surprise_probe.core.models.attention.fused_attention) computes what the model's own
attention computes (in the sweep's suffix engine, and on left-padded batches with a key-value
cache as the sampler runs it), falls back where it would not, and always puts the model back."""

from __future__ import annotations

import contextlib
import warnings

import pytest

from surprise_probe.core.models.backends import hooked_transformer_available

# HookedTransformer's fused attention (the bridge's: tests/test_bridge_fused_attention.py); on
# TransformerLens 4.x, which has no HookedTransformer, this module skips as a whole.
if not hooked_transformer_available():
    pytest.skip("HookedTransformer's fused attention; TransformerLens 4.x has no HookedTransformer "
                "(tests/test_bridge_fused_attention.py covers the bridge)", allow_module_level=True)

import torch  # noqa: E402
from surprise_probe.interventions import suffix  # noqa: E402
from surprise_probe.interventions.suffix import clean_prefix, run_from_hook  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from surprise_probe.core.forward.sampling import decoding_layout
from surprise_probe.core.models.attention import fused_attention
from surprise_probe.testing import tiny_hooked_transformer


def _model(**overrides) -> HookedTransformer:
    cfg = dict(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=50, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="rotary", seed=0,
    )
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(HookedTransformerConfig(**cfg)).eval()


MODELS = {
    "rotary": lambda: tiny_hooked_transformer(n_layers=3),
    "standard positions": lambda: _model(positional_embedding_type="standard"),
    "grouped-query, RMSNorm": lambda: _model(n_key_value_heads=2, normalization_type="RMS", act_fn="silu", gated_mlp=True),
    "local window": lambda: _model(attn_types=["local", "global", "local"], window_size=5),
    "scaled by layer": lambda: _model(scale_attn_by_inverse_layer_idx=True),
}


def _suffix_outputs(model, tokens, start: int, edits) -> torch.Tensor:
    prefix = clean_prefix(model, tokens, 1, start)
    return run_from_hook(model, prefix, prefix.residual + edits)


@pytest.mark.parametrize("start", [0, 9])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_the_models_attention(name, start, monkeypatch):
    model = MODELS[name]()
    with fused_attention(model, [1, 2]) as fused:
        assert fused, f"{name}: expected the fused path to apply"
    tokens = torch.randint(0, int(model.cfg.d_vocab), (1, 21), generator=torch.Generator().manual_seed(1))
    edits = torch.randn(3, 21 - start, int(model.cfg.d_model), generator=torch.Generator().manual_seed(2))
    fused_out = _suffix_outputs(model, tokens, start, edits)
    monkeypatch.setattr(suffix, "FUSE_ATTENTION", False)
    own_out = _suffix_outputs(model, tokens, start, edits)
    torch.testing.assert_close(fused_out, own_out, atol=1e-5, rtol=1e-5)
    # And both equal the plain full forward of the unedited sequence (row of zero edit).
    clean = _suffix_outputs(model, tokens, start, torch.zeros_like(edits[:1]))
    monkeypatch.setattr(suffix, "FUSE_ATTENTION", True)
    clean_fused = _suffix_outputs(model, tokens, start, torch.zeros_like(edits[:1]))
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    full = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, start:]
    torch.testing.assert_close(clean, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean_fused, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    ["softcap", "hook", "attn_result"],
)
def test_falls_back_where_it_is_not_the_same_computation(change):
    model = _model(attn_scores_soft_cap=5.0) if change == "softcap" else _model(use_attn_result=change == "attn_result")
    seen = []
    if change == "hook":
        model.blocks[2].attn.hook_pattern.add_hook(lambda x, hook: seen.append(hook.name))
    with fused_attention(model, [1, 2]) as fused:
        assert not fused
        assert all("forward" not in vars(block.attn) for block in model.blocks)
    if change == "hook":  # and the model's attention (with its hook) is what runs
        tokens = torch.arange(12).unsqueeze(0)
        prefix = clean_prefix(model, tokens, 1, 4)
        seen.clear()  # the clean prompt ran block 2 too
        run_from_hook(model, prefix, prefix.residual)
        assert seen == ["blocks.2.attn.hook_pattern"]


def test_model_is_put_back_even_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), fused_attention(model, [0, 1, 2]) as fused:
        assert fused and all("forward" in vars(block.attn) for block in model.blocks)
        raise RuntimeError("boom")
    assert all("forward" not in vars(block.attn) for block in model.blocks)


def _padded_decode(model, tokens, mask, steps):
    """Left-padded prefill with a key-value cache, then one-token steps: every step's logits."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    outputs = [model(tokens, attention_mask=mask, past_kv_cache=cache)]
    for step in steps.T:
        outputs.append(model(step[:, None], attention_mask=torch.ones_like(step[:, None]), past_kv_cache=cache))
    return outputs


@pytest.mark.parametrize("layout", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_the_models_attention_on_left_padded_batches_with_a_cache(name, layout):
    """What the sampler runs: rows of different lengths, left-padded, then decoding steps."""
    model = MODELS[name]()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, int(model.cfg.d_vocab), (3, 10), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # row 1 has 6 real tokens, row 2 has 1
    mask[2, :9] = 0
    steps = torch.randint(1, int(model.cfg.d_vocab), (3, 4), generator=generator)
    with torch.no_grad(), decoding_layout(model) if layout else contextlib.nullcontext():
        own = _padded_decode(model, tokens, mask, steps)
        with fused_attention(model, range(model.cfg.n_layers)) as fused:
            assert fused
            ours = _padded_decode(model, tokens, mask, steps)
    assert all("forward" not in vars(block.attn) for block in model.blocks)
    for step, (a, b) in enumerate(zip(ours, own, strict=True)):
        # Every position, pad positions included (TransformerLens zeroes their attention; so does the fused path).
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}, step {step}")
    # Padding really changed something: row 2 alone (unpadded) gives the same last logits as in the batch.
    alone = model(tokens[2:, 9:])
    torch.testing.assert_close(ours[0][2, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
