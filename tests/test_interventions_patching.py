"""Activation patching (alignment, fractions closed, mismatched spans) and steered generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions import (
    Steer,
    SteeringDirection,
    activation_patching,
    align_positions,
    generate,
)

from surprise_probe.core.text.encoding import encode

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _conversation(answer: str, prompt: str = "Hello world, how are you today?"):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


PAIRS = [
    (_conversation("A cat sat on the mat."), _conversation("Rivers flow to the sea; mountains rise to the sky.")),
    (_conversation("Numbers like 12 appear in text too."), _conversation("The quick brown fox jumps.")),
]


def _direction(model) -> SteeringDirection:
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    return SteeringDirection(d / d.norm(), HOOKS[1], 1.0)


def test_alignment_starts_at_the_response_and_truncates_to_the_shorter(tiny_model):
    source = encode(tiny_model, {"token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "scored": [0, 0, 0, 1, 1, 1, 1, 1]})
    destination = encode(tiny_model, {"token_ids": [1, 2, 3, 4, 5, 6], "scored": [0, 0, 0, 0, 1, 1]})
    dst, src = align_positions(source, destination, "response")
    assert dst.tolist() == [4, 5] and src.tolist() == [3, 4]
    dst, src = align_positions(source, destination, "first1")
    assert dst.tolist() == [4] and src.tolist() == [3]
    dst, src = align_positions(source, destination, "prompt")  # backwards from the response start
    assert dst.tolist() == [1, 2, 3] and src.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown position group 'middle'"):
        align_positions(source, destination, "middle")


def test_whole_response_patch_closes_the_gap_and_prompt_patch_closes_nothing(tiny_model):
    result = activation_patching(tiny_model, PAIRS, hooks=HOOKS, direction=_direction(tiny_model),
                                 groups=["prompt", "response", "first2"], progress=False, n_boot=100)
    whole = np.asarray(result.fraction["all"])
    # Same prompt: every response position patched at any layer reproduces the source exactly.
    np.testing.assert_allclose(whole[:, 1], 1.0, atol=1e-4)
    # Identical prompts have identical activations there: patching them changes nothing.
    np.testing.assert_allclose(whole[:, 0], 0.0, atol=1e-4)
    assert np.isfinite(result.fraction["direction"]).all()
    assert result.n_pairs == 2 and len(result.per_pair_gap) == 2
    assert result.entropy_source != pytest.approx(result.entropy_destination, abs=1e-9)


def test_direction_component_patch_at_last_layer_moves_only_along_d(tiny_model):
    """Patching the d-component into the destination makes its projection equal the source's."""
    from surprise_probe.interventions import Patch

    direction = _direction(tiny_model)
    source = torch.tensor([[1, 20, 21, 22, 23]])
    destination = torch.tensor([[1, 30, 31, 32, 33]])
    hook, stored = HOOKS[1], {}

    def keep(name):
        def fn(activation, hook):  # noqa: ARG001
            stored.setdefault(name, activation.detach().clone())
        return fn

    with torch.no_grad():
        tiny_model.run_with_hooks(source, fwd_hooks=[(hook, keep("source"))])
        mask = torch.tensor([[False, False, True, True, True]])
        patch = Patch(hooks=hook, positions=mask, source=stored["source"], source_index=torch.arange(5)[None],
                      direction=direction.direction)
        with patch.apply(tiny_model):
            tiny_model.run_with_hooks(destination, fwd_hooks=[(hook, keep("patched"))])
        tiny_model.run_with_hooks(destination, fwd_hooks=[(hook, keep("clean"))])
    d = direction.direction
    patched, clean, src = stored["patched"][0], stored["clean"][0], stored["source"][0]
    torch.testing.assert_close(patched[2:] @ d, src[2:] @ d, atol=1e-4, rtol=0)
    rest = patched - (patched @ d)[:, None] * d
    rest_clean = clean - (clean @ d)[:, None] * d
    torch.testing.assert_close(rest, rest_clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(patched[:2], clean[:2])


def test_mismatched_spans_are_a_clear_error(tiny_model):
    no_response = {"token_ids": [1, 5, 6, 7], "scored": [False] * 4}
    with pytest.raises(ValueError, match="pair 1: the destination has no scored"):
        activation_patching(tiny_model, [PAIRS[0], (PAIRS[0][0], no_response)], hooks=HOOKS,
                            components=["all"], progress=False)
    with pytest.raises(ValueError, match="pair 0: the source has no scored"):
        activation_patching(tiny_model, [(no_response, PAIRS[0][1])], hooks=HOOKS, components=["all"],
                            progress=False)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        from surprise_probe.interventions import resid_hooks

        resid_hooks(tiny_model, [0, 5])


def test_steered_generation_is_seeded_and_steering_changes_it(tiny_model):
    prompt = [{"role": "user", "content": "Hello world, how are you today?"}]
    d = _direction(tiny_model)
    plain = generate(tiny_model, prompt, max_new_tokens=5, seed=3, n_samples=2, stop_at_eos=False)
    again = generate(tiny_model, prompt, max_new_tokens=5, seed=3, n_samples=2, stop_at_eos=False)
    assert [s.token_ids for s in plain] == [s.token_ids for s in again]
    assert len(plain[0].token_ids) == 5 and isinstance(plain[0].text, str)
    zero = Steer(hooks=d.hook, direction=d.direction, strength=0.0)
    greedy = generate(tiny_model, prompt, max_new_tokens=4, temperature=0, stop_at_eos=False)
    greedy_zero = generate(tiny_model, prompt, zero, max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert greedy[0].token_ids == greedy_zero[0].token_ids
    strong = Steer(hooks=d.hook, direction=d.direction, strength=200.0)
    steered = generate(tiny_model, prompt, strong, max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert steered[0].token_ids != greedy[0].token_ids
    assert all(len(p.fwd_hooks) == 0 for p in tiny_model.hook_dict.values())


def test_random_direction_controls_equal_patching_along_each_random_direction(tiny_model):
    from surprise_probe.interventions import random_directions

    result = activation_patching(tiny_model, PAIRS, hooks=HOOKS, direction=_direction(tiny_model),
                                 groups=["response", "first2"], components=["direction"], random_directions=3,
                                 seed=4, progress=False, n_boot=50)
    vectors = random_directions(tiny_model.cfg.d_model, 3, seed=4)
    for k in range(3):  # each control is the same patch along the k-th seeded random unit direction
        alone = activation_patching(tiny_model, PAIRS, hooks=HOOKS, direction=SteeringDirection(vectors[k], HOOKS[1], 1.0),
                                    groups=["response", "first2"], components=["direction"], progress=False, n_boot=50)
        for h in range(2):
            for g in range(2):
                assert result.random_fraction[h][g][k] == pytest.approx(alone.fraction["direction"][h][g], abs=1e-5)
    cell = np.asarray(result.random_fraction[1][0])
    expected_z = (result.fraction["direction"][1][0] - cell.mean()) / cell.std(ddof=1)
    assert result.z[1][0] == pytest.approx(expected_z, rel=1e-6)
    assert result.random_mean[1][0] == pytest.approx(cell.mean())
    # 3 directions and 2 pairs are too few: both are said, with how many are needed
    assert any("3 random directions" in w and "at least 10" in w for w in result.warnings)
    assert any("CIs from 2 pairs" in w for w in result.warnings)
    rows = result.table()
    assert len(rows) == 4 and rows[0]["z_vs_random"] == result.z[0][0] and rows[0]["layer"] == 0


def test_a_group_without_positions_is_na_not_zero(tiny_model):
    from surprise_probe.interventions.experiments import PatchingExperiment
    from surprise_probe.interventions.plots import patching_figure

    texts = [("The cat sat on the mat today.", "A dog ran in the park at noon."),
             ("Numbers like 12 appear in text.", "The quick brown fox jumps high.")]
    result = activation_patching(tiny_model, texts, hooks=HOOKS, direction=_direction(tiny_model),
                                 groups=["prompt", "response"], random_directions=2, progress=False, n_boot=50)
    assert result.group_positions["prompt"] == 0 and result.group_positions["response"] > 0
    for component in ("direction", "all"):
        assert [row[0] for row in result.fraction[component]] == [None, None]
        assert [row[0] for row in result.fraction_ci[component]] == [None, None]
        assert all(np.isfinite(row[1]) for row in result.fraction[component])
    assert result.random_fraction[0][0] is None and result.z[0][0] is None
    assert any("'prompt' has no positions" in w for w in result.warnings)
    summary = PatchingExperiment("tiny", {}, result).summary()
    assert "n/a" in summary and "0.000" not in summary.split("fraction of the gap closed (direction)")[1].split("\n")[2]
    heatmap = patching_figure(result).data[0]
    assert heatmap.text[0][0] == "n/a" and np.isnan(heatmap.z[0][0])
    assert result.to_dict()["fraction"]["all"][0][0] is None
