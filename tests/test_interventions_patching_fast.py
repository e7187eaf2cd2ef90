"""The patched-run engine (start at the patched block, unembed only measured positions) against
the straightforward computation: one full forward per pair x condition, full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions import activation_patching
from surprise_probe.interventions.patching import align_positions, patched_entropies

from surprise_probe.core.forward.directions import random_directions
from surprise_probe.core.forward.edits import Patch, apply_all
from surprise_probe.core.text.encoding import encode

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
GROUPS = ["prompt", "response", "first2"]


def _conversation(answer: str, prompt: str):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


PAIRS = [  # different prompts and lengths, so every group moves the entropy and batches are padded
    (_conversation("A cat sat.", "Hi there?"), _conversation("Rivers flow to the sea.", "Tell me geography.")),
    (_conversation("Numbers like 12.", "Count."), _conversation("The fox jumps.", "A sentence, quickly.")),
    (_conversation("Yes.", "Rain?"), _conversation("No, it is sunny.", "Weather?")),
]


def _entropy64(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _alignments(encoded, groups) -> dict:
    """``align_positions`` of every pair for each group, and the measured span (the response)."""
    return {(i, group): align_positions(src, dst, "response" if group == "measured" else group, i)
            for i, (src, dst) in enumerate(encoded) for group in [*groups, "measured"]}


def _reference(model, encoded, alignments, conditions, vectors, hooks=HOOKS):
    """One full forward per run, full logits, float64 entropy."""
    n = len(encoded)
    h_src, h_dst, h_patched = np.zeros(n), np.zeros(n), np.zeros((len(conditions), n))
    for i, (src, dst) in enumerate(encoded):
        src_tokens = torch.as_tensor(src.token_ids).unsqueeze(0)
        dst_tokens = torch.as_tensor(dst.token_ids).unsqueeze(0)
        measured_dst, measured_src = alignments[i, "measured"]
        with torch.no_grad():
            src_logits, cache = model.run_with_cache(src_tokens, names_filter=lambda name: name in hooks)
            dst_logits = model(dst_tokens)
        h_src[i] = float(_entropy64(src_logits[0, measured_src]).mean())
        h_dst[i] = float(_entropy64(dst_logits[0, measured_dst]).mean())
        for c, (component, hook, group) in enumerate(conditions):
            dst_pos, src_pos = alignments[i, group]
            mask = torch.zeros(1, len(dst), dtype=torch.bool)
            index = torch.zeros(1, len(dst), dtype=torch.long)
            mask[0, dst_pos] = True
            index[0, dst_pos] = torch.as_tensor(src_pos, dtype=torch.long)
            patch = Patch(hooks=hook, positions=mask, source=cache[hook], source_index=index,
                          direction=vectors[component])
            with torch.no_grad(), apply_all(model, [patch]):
                logits = model(dst_tokens)
            h_patched[c, i] = float(_entropy64(logits[0, measured_dst]).mean())
    return h_src, h_dst, h_patched


@pytest.mark.parametrize(("batch_size", "max_batch_tokens", "groups"), [
    (32, 8192, GROUPS), (200, 100_000, GROUPS), (3, 8192, GROUPS),
    (32, 8192, ["response", "first2"]),  # patched runs start at the response: the prompt comes from the cache
    (200, 100_000, ["first2"]),
])
def test_patched_entropies_match_full_forwards(any_model, batch_size, max_batch_tokens, groups):
    tiny_model = any_model
    encoded = [(encode(tiny_model, s), encode(tiny_model, d)) for s, d in PAIRS]
    alignments = _alignments(encoded, groups)
    d_model = int(tiny_model.cfg.d_model)
    vectors = {"direction": random_directions(d_model, 1, seed=3)[0], "all": None,
               "random0": random_directions(d_model, 1, seed=4)[0]}
    conditions = [(c, h, g) for c in vectors for h in HOOKS for g in groups]
    got = patched_entropies(tiny_model, encoded, alignments, conditions, vectors, range(len(encoded)),
                            batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    want = _reference(tiny_model, encoded, alignments, conditions, vectors)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
    # what the analyses use: the entropy each patch moves
    moved_got, moved_want = got[2] - got[1], want[2] - want[1]
    np.testing.assert_allclose(moved_got, moved_want, rtol=0, atol=3e-6)
    assert np.abs(moved_want).max() > 100 * 3e-6  # the patches do move the entropy



def test_activation_patching_fractions_match_the_reference(tiny_hooked):
    direction = random_directions(int(tiny_hooked.cfg.d_model), 1, seed=3)[0]
    from surprise_probe.interventions import SteeringDirection

    steering = SteeringDirection(direction, HOOKS[1], 1.0)
    result = activation_patching(tiny_hooked, PAIRS, hooks=HOOKS, groups=GROUPS, direction=steering, n_boot=50,
                                 progress=False)
    encoded = [(encode(tiny_hooked, s), encode(tiny_hooked, d)) for s, d in PAIRS]
    alignments = _alignments(encoded, GROUPS)
    conditions = [(c, h, g) for c in ("direction", "all") for h in HOOKS for g in GROUPS]
    h_src, h_dst, h_patched = _reference(tiny_hooked, encoded, alignments, conditions,
                                         {"direction": direction, "all": None})
    gap = (h_src - h_dst).mean()
    expected = (h_patched - h_dst).mean(1) / gap
    assert result.per_pair_gap == pytest.approx((h_src - h_dst).tolist(), abs=3e-6)
    for c, (component, hook, group) in enumerate(conditions):
        h, g = HOOKS.index(hook), GROUPS.index(group)
        assert result.entropy_patched[component][h][g] == pytest.approx(h_patched[c].mean(), abs=3e-6)
        # float32 noise of ~3e-6 nats over a gap of a few 1e-3 nats
        assert result.fraction[component][h][g] == pytest.approx(expected[c], abs=6e-6 / abs(gap))


def test_per_pair_moves_are_the_attribution_stage_exact_values(tiny_hooked):
    """activation_patching's per-pair moves along d are what validate_attribution patches, so the
    study passes them on instead of patching again."""
    from surprise_probe.interventions import SteeringDirection
    from surprise_probe.interventions.attribution import validate_attribution

    direction = random_directions(int(tiny_hooked.cfg.d_model), 1, seed=3)[0]
    steering = SteeringDirection(direction, HOOKS[1], 1.0)
    groups = ["response", "first2"]
    patched = activation_patching(tiny_hooked, PAIRS, hooks=HOOKS, groups=groups, direction=steering, n_boot=20,
                                  random_directions=1, progress=False)
    moved = np.asarray(patched.per_pair_moved["direction"], float).transpose(2, 0, 1)  # pair, hook, group
    measured = validate_attribution(tiny_hooked, PAIRS, direction=steering, hooks=HOOKS, groups=groups,
                                    progress=False)
    np.testing.assert_allclose(moved, measured.exact, rtol=0, atol=3e-6)
    assert np.abs(moved).max() > 1e-3
    # the per-pair moves average to the reported patched entropy minus the destination's
    np.testing.assert_allclose(moved.mean(0), np.asarray(patched.entropy_patched["direction"], float)
                               - patched.entropy_destination, rtol=0, atol=1e-9)
    reused = validate_attribution(tiny_hooked, PAIRS, direction=steering, hooks=HOOKS, groups=groups,
                                  progress=False, exact=moved)
    assert reused.exact == moved.tolist() and reused.n_points == measured.n_points
    with pytest.raises(ValueError, match=r"exact has shape \(2, 2, 2\); expected pairs x hooks x groups"):
        validate_attribution(tiny_hooked, PAIRS, direction=steering, hooks=HOOKS, groups=groups, progress=False,
                             exact=moved[:2])


@pytest.fixture(scope="module")
def three_layer_bridge():
    from surprise_probe.testing import tiny_bridge

    return tiny_bridge(n_layers=3)


@pytest.mark.parametrize(("batch_size", "groups", "layers"), [
    (32, GROUPS, (0, 1)), (3, ["response", "first2"], (0, 1)),
    (32, GROUPS, (1, 2)),  # after the last block: the final norm and unembedding only
])
def test_bridge_patched_runs_start_after_the_patched_block(three_layer_bridge, monkeypatch, batch_size, groups,
                                                           layers):
    """On a TransformerBridge, patching after block L runs blocks L + 1 ... only (bridge_from_layer):
    block 0 runs in the clean source and destination forwards alone, and every entropy is the full
    forwards' to float tolerance."""
    from surprise_probe.interventions import patched_runs as patching

    model = three_layer_bridge
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    assert patching.resid_post_layers(model, hooks) == dict(zip(hooks, layers, strict=True))
    assert patching.resid_post_layers(model, [*hooks, "blocks.1.hook_mlp_out"]) is None
    encoded = [(encode(model, s), encode(model, d)) for s, d in PAIRS]
    alignments = _alignments(encoded, groups)
    d_model = int(model.cfg.d_model)
    vectors = {"direction": random_directions(d_model, 1, seed=3)[0], "all": None}
    conditions = [(c, h, g) for c in vectors for h in hooks for g in groups]
    started, first_block = [], []
    start = patching.bridge_from_layer
    monkeypatch.setattr(patching, "bridge_from_layer", lambda m, layer, r: started.append(layer) or start(m, layer, r))
    handle = model.blocks[0].register_forward_hook(lambda module, inputs, output: first_block.append(1))
    try:
        got = patched_entropies(model, encoded, alignments, conditions, vectors, range(len(encoded)),
                                batch_size=batch_size)
    finally:
        handle.remove()
    chunks = -(-len(encoded) // max(1, batch_size // len(conditions)))
    assert set(started) == {layer + 1 for layer in layers}  # 3: the final norm and unembedding only
    assert len(first_block) == 2 * chunks  # the clean source and destination, per chunk
    want = _reference(model, encoded, alignments, conditions, vectors, hooks)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
    moved_got, moved_want = got[2] - got[1], want[2] - want[1]
    np.testing.assert_allclose(moved_got, moved_want, rtol=0, atol=3e-6)
    assert np.abs(moved_want).max() > 100 * 3e-6


def test_a_bridge_that_cannot_start_after_the_patch_says_so(three_layer_bridge, monkeypatch):
    from surprise_probe.interventions import patched_runs, suffix

    model = three_layer_bridge
    monkeypatch.setattr(suffix, "_EMBEDDING_FEEDS_LAYERS", frozenset({"SomeOtherModel"}))
    assert patched_runs.resid_post_layers(model, HOOKS) is None
    encoded = [(encode(model, s), encode(model, d)) for s, d in PAIRS[:1]]
    alignments = _alignments(encoded, ["response"])
    conditions = [("all", HOOKS[0], "response")]
    with pytest.warns(UserWarning, match="activation patching on this TransformerBridge runs whole forwards"):
        got = patched_entropies(model, encoded, alignments, conditions, {"all": None}, [0])
    want = _reference(model, encoded, alignments, conditions, {"all": None})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
