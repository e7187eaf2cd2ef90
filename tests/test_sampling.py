"""The one sampler: exact ids, KV cache equals full forwards, seeds independent of batching, stops."""

from dataclasses import replace

import pytest
import torch

from surprise_probe.core.forward.sampling import (
    _next_tokens,
    chat_prompt_ids,
    end_of_turn_ids,
    plain_prompt_ids,
    row_seed,
    sample,
)
from tests.conftest import needs_hooked_transformer

PROMPTS = ["Hello world, how are you?", "The quick brown fox", "Hi"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(model):
    return [chat_prompt_ids(model, p) for p in PROMPTS]


def _greedy_reference(model, ids, n):
    """Greedy continuation by a full forward of the whole sequence per new token (no cache)."""
    tokens = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(tokens)[0, -1].argmax())
            out.append(next_id)
            tokens = torch.cat([tokens, torch.tensor([[next_id]])], 1)
    return out


def test_cached_greedy_equals_full_forward_per_token(tiny_model):
    sampled = sample(tiny_model, _prompts(tiny_model), max_new_tokens=7, temperature=0, stop_ids=(), batch_size=3)
    for item, ids in zip(sampled, _prompts(tiny_model), strict=True):
        assert item.prompt_ids == ids
        assert item.response_ids == _greedy_reference(tiny_model, ids, 7)


def test_sampled_ids_read_back_exactly(tiny_model):
    (item,) = sample(tiny_model, _prompts(tiny_model)[:1], max_new_tokens=6, temperature=1.0, seed=2, stop_ids=())
    assert item.token_ids == item.prompt_ids + item.response_ids
    assert item.scored == [False] * len(item.prompt_ids) + [True] * 6
    # The probability the model gave each sampled token is positive (the ids are what it drew).
    with torch.no_grad():
        logits = tiny_model(torch.tensor([item.token_ids]))[0].float()
    n = len(item.prompt_ids)
    log_probs = torch.log_softmax(logits[n - 1 : -1], -1)
    assert torch.isfinite(log_probs[torch.arange(6), torch.tensor(item.response_ids)]).all()


def test_same_seed_same_ids_whatever_the_batching(tiny_model):
    prompts = _prompts(tiny_model)
    together = sample(tiny_model, prompts, n_samples=2, max_new_tokens=6, seed=5, batch_size=6)
    one_by_one = sample(tiny_model, prompts, n_samples=2, max_new_tokens=6, seed=5, batch_size=1)
    reordered = sample(tiny_model, prompts[::-1], n_samples=2, max_new_tokens=6, seed=5, batch_size=4)
    assert [s.response_ids for s in together] == [s.response_ids for s in one_by_one]
    by_key = {(tuple(s.prompt_ids), s.sample_index): s.response_ids for s in reordered}
    assert all(by_key[(tuple(s.prompt_ids), s.sample_index)] == s.response_ids for s in together)
    assert [(s.prompt_index, s.sample_index) for s in together] == [(p, j) for p in range(3) for j in range(2)]
    other_seed = sample(tiny_model, prompts, n_samples=2, max_new_tokens=6, seed=6, batch_size=6)
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in together]
    assert together[0].response_ids != together[1].response_ids  # two samples of one prompt differ


def test_inverse_cdf_draws_the_interval_the_uniform_falls_in():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.0]])).repeat(5, 1)
    uniforms = torch.tensor([0.1, 0.2, 0.69, 0.75, 0.9999], dtype=torch.float64)
    assert _next_tokens(logits, uniforms, 1.0).tolist() == [0, 1, 1, 2, 2]  # token 3 (p = 0) never
    assert _next_tokens(logits, uniforms, 0.0).tolist() == [1] * 5
    with pytest.raises(ValueError, match="non-finite logits"):
        _next_tokens(torch.tensor([[float("nan"), 0.0]]), uniforms[:1], 1.0)


def test_frequencies_follow_the_tempered_softmax(tiny_hooked):
    ids = _prompts(tiny_hooked)[2]
    draws = sample(tiny_hooked, [ids], n_samples=400, max_new_tokens=1, temperature=0.2, stop_ids=(), batch_size=400)
    with torch.no_grad():
        logits = tiny_hooked(torch.tensor([ids]))[0, -1].double()
    counts = torch.bincount(torch.tensor([d.response_ids[0] for d in draws]), minlength=len(logits)).double()

    def total_variation(probs):
        return float(0.5 * (counts / 400 - probs).abs().sum())

    # Measured: 0.09 against softmax(logits / 0.2); 0.29 against softmax(logits / 0.3), the wrong temperature.
    assert total_variation(torch.softmax(logits / 0.2, -1)) < 0.15
    assert total_variation(torch.softmax(logits / 0.3, -1)) > 0.2


def test_stops_at_end_of_turn_and_keeps_the_stop_id(tiny_hooked):
    ids = _prompts(tiny_hooked)[0]
    free = sample(tiny_hooked, [ids], max_new_tokens=8, temperature=0, stop_ids=())[0].response_ids
    stop = free[3]
    (item,) = sample(tiny_hooked, [ids], max_new_tokens=8, temperature=0, stop_ids={stop})
    cut = free.index(stop)
    assert item.response_ids == free[: cut + 1] and item.ended
    assert item.content_ids == free[:cut]
    assert item.scored == [False] * len(ids) + [True] * cut + [False]


def test_end_of_turn_ids_of_the_chat_tokenizer(tiny_hooked):
    vocab = tiny_hooked.tokenizer.get_vocab()
    assert end_of_turn_ids(tiny_hooked) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}


def test_forward_context_sees_one_prefill_then_steps(tiny_model):
    phases = []

    def context(phase):
        phases.append(phase)
        return torch.no_grad()

    sample(tiny_model, _prompts(tiny_model)[:1], max_new_tokens=5, stop_ids=(), forward_context=context)
    assert phases == ["prefill"] + ["step"] * 4


def test_prompt_formats_and_bad_arguments(tiny_hooked):
    text = tiny_hooked.tokenizer.decode(plain_prompt_ids(tiny_hooked, "What is 2?"))
    assert text.endswith("Question: What is 2?\nAnswer:")
    ids = _prompts(tiny_hooked)[0]
    assert row_seed(0, 0, ids) != row_seed(0, 1, ids) and row_seed(0, 0, ids) == row_seed(0, 0, list(ids))
    with pytest.raises(ValueError, match="temperature must be"):
        sample(tiny_hooked, [ids], temperature=-1)
    with pytest.raises(ValueError, match="exceeds n_ctx 64"):
        sample(tiny_hooked, [ids], max_new_tokens=60)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        sample(tiny_hooked, [ids, []], max_new_tokens=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        sample(tiny_hooked, [ids], n_samples=0, max_new_tokens=4)


@pytest.mark.parametrize("steer", ["response", "all"])
def test_steered_generation_with_the_cache_equals_steering_full_forwards(tiny_model, steer):
    from surprise_probe.interventions import Steer, apply_all, generate
    from surprise_probe.interventions.steered_generation import prompt_ids

    direction = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    steering = Steer(hooks="blocks.0.hook_resid_post", direction=direction, strength=30.0)
    prompt = [{"role": "user", "content": "Hello world, how are you today?"}]
    got = generate(tiny_model, prompt, steering, max_new_tokens=5, temperature=0, steer=steer, stop_at_eos=False)
    ids = prompt_ids(tiny_model, prompt).tolist()
    n_prompt, tokens = len(ids), torch.tensor([ids])
    positions = slice(n_prompt - 1, None) if steer == "response" else None
    with torch.no_grad(), apply_all(tiny_model, [replace(steering, positions=positions)]):
        for _ in range(5):  # reference: the whole sequence re-read and re-steered per token
            next_id = tiny_model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, next_id.view(1, 1)], 1)
    assert got[0].token_ids == tokens[0, n_prompt:].tolist()
    plain = generate(tiny_model, prompt, max_new_tokens=5, temperature=0, stop_at_eos=False)
    assert plain[0].token_ids != got[0].token_ids  # the steering changed what was sampled


def _gated_gqa_model(tokenizer):
    """A tiny Llama-like HookedTransformer: gated MLP, grouped-query attention, RMSNorm, rotary."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=64, n_ctx=64,
        d_vocab=len(tokenizer), act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", seed=3,
    )
    return HookedTransformer(cfg, tokenizer).eval()


def test_decoding_layout_removes_weight_copies_and_changes_nothing_else(tiny_tokenizer, monkeypatch):
    needs_hooked_transformer()  # a HookedTransformer's weight layout (TransformerLens 3.x)
    import contextlib

    import einops

    import surprise_probe.core.forward.sampling as sampling

    model = _gated_gqa_model(tiny_tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = _prompts(model)
    with sampling.decoding_layout(model):
        block = model.blocks[0]
        # TransformerLens' own per-forward transforms are now views of the stored weights.
        assert block.mlp.W_gate.T.contiguous().data_ptr() == block.mlp.W_gate.data_ptr()
        assert model.unembed.W_U.T.contiguous().data_ptr() == model.unembed.W_U.data_ptr()
        w_o = einops.rearrange(block.attn.W_O, "h d m -> m (h d)").contiguous()
        assert w_o.data_ptr() == block.attn.W_O.data_ptr()
        w_k = einops.rearrange(block.attn._W_K, "h m d -> (h d) m")
        assert w_k.data_ptr() == block.attn._W_K.data_ptr()
    for name, p in model.named_parameters():
        assert p.is_contiguous() and not p.is_inference() and torch.equal(p, before[name]), name
    # Re-entrant: an inner layout (one sample call of many) neither re-lays nor restores the weights.
    with sampling.decoding_layout(model):
        pointer = model.unembed.W_U.data_ptr()
        with sampling.decoding_layout(model):
            assert model.unembed.W_U.data_ptr() == pointer
        assert model.unembed.W_U.data_ptr() == pointer and not model.unembed.W_U.is_contiguous()
    assert all(p.is_contiguous() and torch.equal(p, before[name]) for name, p in model.named_parameters())
    greedy = sample(model, prompts[:1], max_new_tokens=6, temperature=0, stop_ids=())
    assert greedy[0].response_ids == _greedy_reference(model, prompts[0], 6)
    with_layout = sample(model, prompts, n_samples=2, max_new_tokens=8, seed=5, batch_size=3)
    monkeypatch.setattr(sampling, "decoding_layout", lambda model: contextlib.nullcontext(model))
    without = sample(model, prompts, n_samples=2, max_new_tokens=8, seed=5, batch_size=3)
    assert [s.response_ids for s in with_layout] == [s.response_ids for s in without]


def test_fused_attention_samples_what_the_models_attention_samples(tiny_hooked, monkeypatch):
    """The sampler's fused attention (left-padded batches, a key-value cache) draws the same ids
    as TransformerLens' own attention, and a hook the caller puts on the attention still fires."""
    from surprise_probe.core.forward import sampling
    from surprise_probe.core.models.attention import fused_attention

    with fused_attention(tiny_hooked, range(tiny_hooked.cfg.n_layers)) as fusable:
        assert fusable  # so the comparison below is fused against TransformerLens' attention
    prompts = _prompts(tiny_hooked) + [[5, 6, 7]]
    fused = sample(tiny_hooked, prompts, n_samples=2, max_new_tokens=8, seed=3, stop_ids=(), batch_size=8)
    monkeypatch.setattr(sampling, "FUSE_ATTENTION", False)
    own = sample(tiny_hooked, prompts, n_samples=2, max_new_tokens=8, seed=3, stop_ids=(), batch_size=8)
    assert [s.response_ids for s in fused] == [s.response_ids for s in own]
    monkeypatch.setattr(sampling, "FUSE_ATTENTION", True)
    seen = []

    def context(phase):
        return tiny_hooked.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: seen.append(x.shape[-2]))])

    hooked = sample(tiny_hooked, prompts, n_samples=2, max_new_tokens=8, seed=3, stop_ids=(), batch_size=8,
                    forward_context=context)
    assert seen[0] > 1 and seen[1:] == [1] * 7  # the prompt's queries, then one per step
    assert [s.response_ids for s in hooked] == [s.response_ids for s in own]


def test_bridge_sampling_names_the_cache_as_this_transformers_expects():
    """No deprecated ``past_key_values`` (removed in transformers 5.40), and the cache is used:
    greedy ids equal greedy full forwards."""
    import warnings

    from surprise_probe.testing import tiny_bridge

    model = tiny_bridge(n_layers=2, initializer_range=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sample(model, [[7, 8, 9, 10]], max_new_tokens=6, seed=1, temperature=0.0, stop_ids=set())
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    ids = [7, 8, 9, 10]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]), return_type="logits")[0, -1].argmax()))
    assert out[0].response_ids == ids[4:]


def test_load_model_stores_the_forward_layout_with_the_same_numbers(tiny_hf_folder, monkeypatch):
    """A HookedTransformer from load_model keeps its weight matrices in the order TransformerLens'
    forward asks for (its per-forward copies are views), with the values and logits of the
    usual layout; decoding_layout then changes nothing."""
    needs_hooked_transformer()  # a HookedTransformer's weight layout (TransformerLens 3.x)
    import einops

    import surprise_probe.core.forward.sampling as sampling
    from surprise_probe.core.models import loading

    model = loading.load_model(str(tiny_hf_folder), device="cpu", backend="hooked", progress=False)
    monkeypatch.setattr(loading, "FORWARD_LAYOUT_AT_LOAD", False)
    usual = loading.load_model(str(tiny_hf_folder), device="cpu", backend="hooked", progress=False)
    block = model.blocks[0]
    assert block.mlp.W_gate.T.contiguous().data_ptr() == block.mlp.W_gate.data_ptr()
    assert model.unembed.W_U.T.contiguous().data_ptr() == model.unembed.W_U.data_ptr()
    w_o = einops.rearrange(block.attn.W_O, "h d m -> m (h d)").contiguous()
    assert w_o.data_ptr() == block.attn.W_O.data_ptr()
    assert usual.unembed.W_U.is_contiguous()  # the switch off: the usual layout
    usual_params = dict(usual.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, usual_params[name]), name
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), usual(tokens), rtol=0, atol=1e-5)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with sampling.decoding_layout(model):
        assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
