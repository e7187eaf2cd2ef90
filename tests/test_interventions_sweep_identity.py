"""Identity conditions (steering at strength exactly 0) are the clean run: the batched sweep
fills them from it without running rows, with the same numbers as running them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions import dose_response, run_sweep
from surprise_probe.interventions import steering_sweep as sweep_module
from surprise_probe.interventions.direction_comparison import compare_directions
from surprise_probe.interventions.steering_sweep import encode_items, identity_amounts

from surprise_probe.core.models.backends import is_bridge
from tests.conftest import CONVERSATION, TEXTS, random_steering

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
ITEMS = [CONVERSATION, TEXTS[0], TEXTS[3]]


def _steering(model, seed=0, std=1.5):
    return random_steering(model, seed, std, HOOK)


def _run_every_condition(monkeypatch) -> None:
    """The sweep as it was before identity conditions were recognised: every condition runs."""
    monkeypatch.setattr(sweep_module, "identity_amounts", lambda kind, amounts: np.zeros(len(amounts), dtype=bool))


class RowCounter:
    """Rows that go through the model's last block, counted by a PyTorch forward hook."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.blocks[-1].register_forward_hook(self._count)

    def _count(self, module, inputs, output):  # noqa: ARG002 - PyTorch hook signature
        self.rows += int((output[0] if isinstance(output, tuple) else output).shape[0])


@pytest.fixture
def counter(tiny_model):
    counter = RowCounter(tiny_model)
    yield counter
    counter.handle.remove()


def test_identity_amounts_is_only_steering_at_zero():
    assert identity_amounts("steer", [-4.0, 0.0, -0.0, 1e-30, 4.0]).tolist() == [False, True, True, False, False]
    # x - 0 * <x, d> d is NaN where the projection is inf: not the identity, so ablation always runs
    assert identity_amounts("ablate", [0.0, 1.0]).tolist() == [False, False]
    x, d = torch.tensor([[3.0e38, 3.0e38]]), torch.tensor([1.0, 1.0]) / 2**0.5
    assert torch.isnan(x - 0.0 * (x @ d)[:, None] * d).all()


def test_zero_strength_is_filled_from_the_clean_run_with_todays_numbers(tiny_model, counter, monkeypatch):
    strengths = [-4.0, 0.0, 2.0, 6.0]
    kwargs = dict(random_directions=2, batch_size=3, progress=False, n_boot=50)
    new = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, **kwargs)
    new_rows, counter.rows = counter.rows, 0
    with monkeypatch.context() as patched:
        _run_every_condition(patched)
        before = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, **kwargs)
    before_rows, counter.rows = counter.rows, 0
    loop = dose_response(tiny_model, ITEMS, _steering(tiny_model), strengths, batched=False, **kwargs)
    for key in ("entropy", "kl", "top1_agreement", "slopes", "probe_entropy_ci"):
        np.testing.assert_allclose(getattr(new, key), getattr(before, key), atol=1e-6, rtol=0, err_msg=key)
        np.testing.assert_allclose(getattr(new, key), getattr(loop, key), atol=1e-5, rtol=0, err_msg=key)
    assert new.z_score == pytest.approx(before.z_score, abs=1e-4)
    zero = strengths.index(0.0)
    n_dir = len(new.labels)
    assert np.asarray(new.kl)[:, zero].tolist() == [0.0] * n_dir  # exactly, not up to noise
    assert np.asarray(new.top1_agreement)[:, zero].tolist() == [1.0] * n_dir
    np.testing.assert_allclose(np.asarray(new.entropy)[:, zero], new.clean_entropy, rtol=0, atol=1e-12)
    # fewer forwards (3 rows per forward) and at least one row less per (sequence, direction)
    assert new.n_forwards < before.n_forwards
    assert before_rows - new_rows >= len(ITEMS) * n_dir


@pytest.mark.parametrize("positions", ["response", "all"])
def test_rows_run_are_the_distinct_nonidentity_conditions(tiny_model, monkeypatch, positions):
    encoded = encode_items(tiny_model, ITEMS)
    directions = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    amounts = [0.0, 2.0, -1.0, 2.0, -0.0]  # two identities, one repeat: 2 distinct conditions per direction
    kwargs = dict(scale=1.5, positions=positions, progress=False)
    new = run_sweep(tiny_model, encoded, HOOK, directions, amounts, **kwargs)
    loop = run_sweep(tiny_model, encoded, HOOK, directions, amounts, batched=False, **kwargs)
    with monkeypatch.context() as patched:
        _run_every_condition(patched)
        every = run_sweep(tiny_model, encoded, HOOK, directions, amounts, **kwargs)
    assert new.n_rows == len(ITEMS) * 3 * 2
    assert every.n_rows == len(ITEMS) * 3 * 3  # 0.0, 2.0, -1.0: the repeats (2.0, -0.0 == 0.0) run once
    assert loop.n_rows == len(ITEMS) * 3 * len(amounts)  # the naive loop runs every condition
    for name in ("entropy", "kl", "agree"):
        np.testing.assert_allclose(getattr(new, name), getattr(loop, name), atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(getattr(new, name), getattr(every, name), atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_array_equal(getattr(new, name)[:, 3], getattr(new, name)[:, 1])
    for j in (0, 4):
        assert (new.kl[:, j] == 0.0).all() and (new.agree[:, j] == new.n_tokens).all()
        np.testing.assert_array_equal(new.entropy[:, j], np.broadcast_to(new.clean_entropy, (3, len(ITEMS))))
    # the loop computed its zero-strength rows from real forwards: they equal the clean run
    np.testing.assert_allclose(loop.kl[:, [0, 4]], 0.0, atol=1e-6)
    np.testing.assert_allclose(loop.entropy[:, 0], new.entropy[:, 0], atol=1e-5, rtol=0)


def test_only_identity_conditions_still_measure_the_clean_run(tiny_model):
    encoded = encode_items(tiny_model, ITEMS)
    direction = _steering(tiny_model).direction[None]
    table = run_sweep(tiny_model, encoded, HOOK, direction, [0.0], progress=False)
    loop = run_sweep(tiny_model, encoded, HOOK, direction, [0.0], batched=False, progress=False)
    assert table.n_rows == 0 and table.n_forwards == len(ITEMS)  # one clean forward per sequence
    np.testing.assert_allclose(table.clean_entropy, loop.clean_entropy, atol=1e-5, rtol=0)
    assert (table.clean_entropy > 0).all()
    np.testing.assert_array_equal(table.entropy[0, 0], table.clean_entropy)


def test_ablation_at_fraction_zero_still_runs(tiny_model):
    encoded = encode_items(tiny_model, ITEMS)
    direction = _steering(tiny_model).direction[None]
    table = run_sweep(tiny_model, encoded, HOOK, direction, [0.0, 1.0], kind="ablate", progress=False)
    assert table.n_rows == len(ITEMS) * 2
    np.testing.assert_allclose(table.kl[0, 0], 0.0, atol=1e-6)
    assert (table.kl[0, 1] > 0).all()


def test_direction_comparison_skips_the_zero_strength_rows(tiny_model, counter, monkeypatch):
    """The study's compare stage (strengths [-4, 0, 4], random controls) runs a third fewer rows."""
    directions = {"a": _steering(tiny_model, seed=0), "b": _steering(tiny_model, seed=5)}
    kwargs = dict(random_directions=2, n_boot=20, progress=False)
    new = compare_directions(tiny_model, ITEMS, directions, [-4.0, 0.0, 4.0], **kwargs)
    new_rows, counter.rows = counter.rows, 0
    with monkeypatch.context() as patched:
        _run_every_condition(patched)
        before = compare_directions(tiny_model, ITEMS, directions, [-4.0, 0.0, 4.0], **kwargs)
    before_rows = counter.rows
    for got, ref in zip(new.responses, before.responses, strict=True):
        for key in ("entropy", "kl", "top1_agreement"):
            np.testing.assert_allclose(getattr(got, key), getattr(ref, key), atol=1e-6, rtol=0, err_msg=key)
        assert np.asarray(got.kl)[:, 1].tolist() == [0.0] * len(got.labels)
    n_dir = 1 + 2  # each direction with its 2 random controls (no orthogonal one)
    assert before_rows - new_rows >= len(directions) * len(ITEMS) * n_dir


def _assert_same_numbers(a, b, atol: float = 1e-5) -> None:
    """Two sweeps' tables agree: entropy, KL and top-1 agreement per condition and sequence."""
    for key in ("entropy", "kl", "top1_agreement"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=0, atol=atol, err_msg=key)


def _before_and_after(model, steering, kwargs, monkeypatch, switch: str, value, register):
    """``dose_response`` as the sweep module is, then with ``sweep_module.<switch> = value``;
    ``register(records)`` adds the hook that fills ``records`` and returns its handle. Returns
    (result before, records before, result after, records after)."""
    records = []
    handle = register(records)
    try:
        before = dose_response(model, ITEMS, steering, **kwargs)
        before_records = list(records)
        records.clear()
        monkeypatch.setattr(sweep_module, switch, value)
        after = dose_response(model, ITEMS, steering, **kwargs)
    finally:
        handle.remove()
    return before, before_records, after, records


def _unembeds_only_the_scored_positions(model, steering, monkeypatch) -> None:
    """The fan-out engine unembeds each sequence's scored positions only (against all of them with
    KEEP_SCORED_LOGITS off), with every number unchanged."""
    seen = []
    handle = model.unembed.register_forward_hook(lambda module, inputs, output: seen.append(int(output.shape[1])))
    kwargs = dict(strengths=[-2.0, 0.0, 2.0], random_directions=1, n_boot=10, progress=False)
    try:
        kept = dose_response(model, ITEMS, steering, **kwargs)
        widths_kept = list(seen)
        seen.clear()
        monkeypatch.setattr(sweep_module, "KEEP_SCORED_LOGITS", False)
        every = dose_response(model, ITEMS, steering, **kwargs)
    finally:
        handle.remove()
    encoded = encode_items(model, ITEMS)
    # A bridge runs each prompt once (its last position unembedded: width 1) and then the positions
    # from the first scored one on (bridge_frozen_prefix); a HookedTransformer's fan-out runs all.
    bridge = is_bridge(model)
    prompt_runs = {1} if bridge else set()
    run_from = [int(np.flatnonzero(e.scored)[0]) if bridge else 0 for e in encoded]
    # each forward unembeds one sequence's scored positions, against all the positions it ran before
    assert set(widths_kept) == {int(e.scored.sum()) for e in encoded} | prompt_runs
    assert set(seen) == {len(e.token_ids) - f for e, f in zip(encoded, run_from, strict=True)} | prompt_runs
    assert sum(widths_kept) < sum(seen)
    _assert_same_numbers(kept, every)


def test_bridge_unembeds_only_the_scored_positions_with_the_same_numbers(tiny_bridge_model, monkeypatch):
    """On a TransformerBridge the fan-out engine asks for the scored columns' logits only
    (logits_to_keep): the unembedding sees fewer positions, and every number is unchanged."""
    _unembeds_only_the_scored_positions(tiny_bridge_model, _steering(tiny_bridge_model), monkeypatch)


def test_hooked_fan_out_unembeds_only_the_scored_positions_with_the_same_numbers(tiny_hooked, monkeypatch):
    """A HookedTransformer steered at a hook the suffix engine does not take (an MLP output) runs the
    fan-out engine: it too unembeds only the scored positions, with unchanged numbers."""
    steering = random_steering(tiny_hooked, 0, 1.5, "blocks.0.hook_mlp_out")
    _unembeds_only_the_scored_positions(tiny_hooked, steering, monkeypatch)


def test_bridge_runs_each_prompt_once_with_the_same_numbers(tiny_bridge_model, monkeypatch):
    """On a TransformerBridge the fan-out engine runs each prompt (the positions before the first
    edited one) once, freezing its keys and values, and every later forward only the rest: fewer
    positions through the model, every number unchanged against running whole sequences."""
    model = tiny_bridge_model
    kwargs = dict(strengths=[-2.0, 0.0, 2.0, 4.0], random_directions=2, batch_size=3, n_boot=10, progress=False)
    frozen, frozen_positions, whole, positions = _before_and_after(
        model, _steering(model), kwargs, monkeypatch, "FREEZE_PREFIX", False,
        lambda positions: model.blocks[-1].register_forward_hook(lambda module, inputs, output: positions.append(
            int((output[0] if isinstance(output, tuple) else output).shape[1]))))
    encoded = encode_items(model, ITEMS)
    prompts = [int(np.flatnonzero(e.scored)[0]) for e in encoded]
    assert max(prompts) > 0  # the conversation has a prompt; plain texts are scored from position 0
    assert set(frozen_positions) == {p for p in prompts if p} | {len(e.token_ids) - p for e, p in zip(
        encoded, prompts, strict=True)}
    assert set(positions) == {len(e.token_ids) for e in encoded} and sum(frozen_positions) < sum(positions)
    _assert_same_numbers(frozen, whole)


@pytest.mark.parametrize(("hook", "layer"), [(HOOK, 1), ("blocks.1.hook_resid_post", 2)])
def test_bridge_starts_at_the_hook_with_the_same_numbers(tiny_bridge_model, monkeypatch, hook, layer):
    """With several blocks of conditions per sequence, the bridge's fan-out engine runs the blocks
    before the hook once per sequence (the clean residual there) and each block of conditions from
    the hook on (after the last block: the final norm and unembedding only): block 0 runs fewer
    times, every number is unchanged."""
    model = tiny_bridge_model
    assert sweep_module.bridge_start_layer(model, hook) == layer
    kwargs = dict(strengths=[-2.0, 0.0, 2.0, 4.0], random_directions=2, batch_size=3, n_boot=10, progress=False)
    # rows: one entry per forward into block 0
    started, started_rows, whole, rows = _before_and_after(
        model, random_steering(model, 0, 1.5, hook), kwargs, monkeypatch, "START_AT_HOOK", False,
        lambda rows: model.blocks[0].register_forward_pre_hook(lambda module, inputs: rows.append(1)))
    encoded = encode_items(model, ITEMS)
    with_prompt = sum(int(np.flatnonzero(e.scored)[0]) > 0 for e in encoded)
    # Block 0 ran once per prompt and once per block of conditions before; now once per prompt and
    # once per sequence (the clean residual at the hook).
    n_blocks, left = divmod(len(rows) - with_prompt, len(encoded))
    assert left == 0 and n_blocks > 1
    assert len(started_rows) == with_prompt + len(encoded)
    _assert_same_numbers(started, whole)


def test_a_bridge_that_cannot_start_at_the_hook_says_so_and_gives_the_same_numbers(tiny_bridge_model, monkeypatch):
    """A decoder bridge_from_layer does not cover runs whole forwards: a warning names why, and the
    numbers are those of starting at the hook."""
    from surprise_probe.interventions import suffix

    model = tiny_bridge_model
    kwargs = dict(strengths=[-2.0, 2.0], random_directions=1, batch_size=2, n_boot=10, progress=False)
    started = dose_response(model, ITEMS, _steering(model), **kwargs)
    monkeypatch.setattr(suffix, "_EMBEDDING_FEEDS_LAYERS", frozenset({"SomeOtherModel"}))
    assert sweep_module.bridge_start_layer(model, HOOK) is None
    with pytest.warns(UserWarning, match=r"the steering sweep on this TransformerBridge runs whole forwards, not "
                                         r"from the edited block on: LlamaModel is not a decoder it covers"):
        whole = dose_response(model, ITEMS, _steering(model), **kwargs)
    _assert_same_numbers(started, whole)


def test_fan_out_bounds_the_logits_of_a_forward_with_the_same_numbers(tiny_bridge_model, monkeypatch):
    """The fan-out engine puts at most LOGITS_ELEMENTS logits in one forward: with a budget of
    three rows of the widest sequence's scored logits, no forward makes more logits than that (so
    there are more forwards), and every number is that of the unbounded sweep."""
    model = tiny_bridge_model
    encoded = encode_items(model, ITEMS)
    budget = 3 * max(int(e.scored.sum()) for e in encoded) * int(model.cfg.d_vocab_out)
    kwargs = dict(strengths=[-2.0, 0.0, 2.0, 4.0], random_directions=2, batch_size=64, n_boot=10, progress=False)
    # sizes: logits per forward
    unbounded, unbounded_sizes, bounded, sizes = _before_and_after(
        model, _steering(model), kwargs, monkeypatch, "LOGITS_ELEMENTS", budget,
        lambda sizes: model.unembed.register_forward_hook(lambda module, inputs, output: sizes.append(output.numel())))
    assert max(unbounded_sizes) > budget  # unbounded, some forward makes more logits than the budget
    assert max(sizes) <= budget and len(sizes) > len(unbounded_sizes)
    _assert_same_numbers(bounded, unbounded)
