"""The study's sizes (default and ``--quick``) and its time estimate, printed at the start."""


from __future__ import annotations

import time

import numpy as np

from surprise_probe.core.models.loading import (
    available_models,
)

# Sizes of the default study: about 15 minutes on 2 CPU cores with the embedded SmolLM2-135M
# (docs/index.md gives the measured time per stage: 397 s with steering on 6 inputs x 4 random
# directions; 10 x 10 adds about 260 s by estimate_seconds; the norm stage about 215 s and the gap's
# temperature curve about 50 s more, about 925 s in all).
DEFAULT_SETTINGS = {
    "max_inputs": 60,  # the first N inputs are captured and probed
    "batch_size": 8,
    # steering and the comparison: at least MIN_UNITS sequences and MIN_RANDOM_DIRECTIONS random
    # directions (core/utils/stats.py), so the report's causal verdict is tested at the default size
    "steer_inputs": 10,
    "strengths": [-4.0, -2.0, 0.0, 2.0, 4.0],
    "compare_strengths": [-4.0, 0.0, 4.0],  # the entropy-direction comparison (3 directions, so fewer)
    "random_directions": 10,
    "n_boot": 1000,
    "seed": 0,
    # the norm control: the surprise direction steered with the norms free / final norm frozen / all later
    # norms frozen, each against the random directions under the same freezing; then the entropy
    # neurons mean-ablated (against random neuron sets). Rows per input: 3 modes x (1 + random) x the
    # non-zero strengths + (1 + random sets) x strengths.
    "norm_inputs": 10,
    "norm_strengths": [-4.0, 0.0, 4.0],
    "norm_neurons": 10,
    "norm_random_neurons": 5,
    "patch_pairs": 6,  # on/off-policy pairs (the model samples one answer per pair)
    "patch_layers": 8,  # evenly spaced layers patched exactly (and validated by attribution)
    "patch_random_directions": 2,  # random directions patched like the probe direction (the control)
    "sample_tokens": 48,  # longest sampled answer (patch pairs and policy gap)
    "token_view_tokens": 112,
    "gap_prompts": 16,
    # the gap's temperature curve: own answers sampled again at each (1.0 reuses the main samples)
    "gap_temperatures": [0.3, 0.7, 1.0],
    "base_reader": None,  # e.g. "gemma-3-270m": a base model that also reads and writes in the gap
    "intention_prompts": 4,  # prompt groups (x 3 phrasings each)
    "intention_samples": 6,
    "intention_tokens": 16,
    "intention_ks": [0, 1, 2, 4, 8],
}

# --quick: every stage on small sizes (2.6 min of stages, 2.8 min wall with the load, peak 2.2 GB on
# the embedded default, 2 idle cores, 2026-11-24; CI's smoke run).
QUICK_SETTINGS = {
    **DEFAULT_SETTINGS,
    "max_inputs": 12,
    "steer_inputs": 2,
    "strengths": [-4.0, 0.0, 4.0],
    "random_directions": 1,
    "n_boot": 200,
    "patch_pairs": 4,
    "patch_layers": 4,
    "patch_random_directions": 1,
    "sample_tokens": 24,
    "token_view_tokens": 64,
    "gap_prompts": 6,
    "gap_temperatures": [0.3, 1.0],
    "norm_inputs": 2,
    "norm_neurons": 4,
    "norm_random_neurons": 1,
    "intention_prompts": 2,
    "intention_samples": 4,
    "intention_tokens": 10,
    "intention_ks": [0, 1, 4],
}

PATCH_GROUPS = ("response", "first4")
# per input-row of the norm control (one condition on one ~230-token conversation, the layers after the
# hook and the unembedding at the scored positions), per second of the calibration forward: 10 built-in
# conversations x 84 rows took 427 s wall (398 CPU s) beside a test run, 2026-12-07
NORM_ROW_SECONDS = 0.12


def patch_layers(n_layers: int, count: int) -> list[int]:
    """``count`` evenly spaced layers from 0 to ``n_layers - 1`` (all when ``count >= n_layers``).

    >>> patch_layers(30, 4), patch_layers(3, 10)
    ([0, 10, 19, 29], [0, 1, 2])
    """
    if count >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(v)) for v in np.linspace(0, n_layers - 1, max(1, count))})


# --- sizes and the time estimate --------------------------------------------------------------------

def describe_sizes(settings: dict, n_items: int) -> str:
    """The sizes a study runs at, one line per stage (printed at the start)."""
    s = settings
    base = s.get("base_reader") or "none"
    return "\n".join([
        f"  capture + probes : {n_items} inputs, every layer; bootstrap {s['n_boot']}",
        f"  steer + compare  : {s['steer_inputs']} inputs x strengths {s['strengths']} x (probe, orthogonal, "
        f"{s['random_directions']} random); compare: 3 directions x {s['compare_strengths']}",
        f"  norm control     : {s['norm_inputs']} inputs x strengths {s['norm_strengths']} x 3 freezings x (probe, "
        f"{s['random_directions']} random); {s['norm_neurons']} entropy neurons vs {s['norm_random_neurons']} random sets",
        f"  patch + attribution: {s['patch_pairs']} on/off-policy pairs (answers up to {s['sample_tokens']} tokens), "
        f"{s['patch_layers']} layers, {s['patch_random_directions']} random directions; token view "
        f"{s['token_view_tokens']} tokens",
        f"  policy gap       : {s['gap_prompts']} prompts, base reader: {base}; detectors; temperature curve "
        f"{s.get('gap_temperatures') or 'off'}",
        f"  intention        : {s['intention_prompts']} prompts x 3 phrasings x {s['intention_samples']} samples "
        f"of {s['intention_tokens']} tokens, ks {s['intention_ks']}",
    ])


def calibration_forward_seconds(model) -> float:
    """Seconds of one forward pass over 8 x 128 tokens (fewer if the context is shorter, scaled up)."""
    import torch

    length = max(2, min(128, int(model.cfg.n_ctx)))
    tokens = torch.randint(0, int(model.cfg.d_vocab), (8, length), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.no_grad():
        model(tokens[:1, :8].to(device), return_type="logits")  # warm-up: the first call pays one-off costs
        started = time.perf_counter()
        model(tokens.to(device), return_type="logits")
        seconds = time.perf_counter() - started
    return seconds * 128 / length


def estimate_seconds(settings: dict, n_items: int, forward_seconds: float, n_layers: int,
                     base_reader: str | None = None) -> dict[str, float]:
    """A rough time per stage (seconds), scaled by ``forward_seconds`` (one 8 x 128-token forward).

    Unit costs were measured on the embedded default (SmolLM2-135M, 2 CPU cores); other models and
    machines scale with the calibration forward. It is an estimate (+/- 50%), printed at the start.
    A base reader adds its load (longer the first time, while its cache is built) and its sampling.

    >>> from surprise_probe.app.study import default_stages
    >>> est = estimate_seconds(QUICK_SETTINGS, 16, 2.0, 30)
    >>> sorted(est) == sorted(stage.name for stage in default_stages()), all(v > 0 for v in est.values())
    (True, True)
    """
    f = forward_seconds
    s = settings
    base_reader_seconds = 0.0
    if base_reader:

        cached = {row["name"]: row["cached"] for row in available_models()}.get(base_reader, False)
        # Its load, then its sampling and reading and the model's reading of its answers: 133 s for
        # the whole gap stage with gemma-3-270m (cached) at the default sizes, f = 2.41 s (2026-11-24).
        base_reader_seconds = (30.0 if cached else 150.0) + 0.021 * f * s["gap_prompts"] * (s["sample_tokens"] + 12)
    strengths, controls = len(s["strengths"]), s["random_directions"] + 2
    extra_temperatures = len([t for t in s.get("gap_temperatures") or () if t != 1.0])
    nonzero = len([v for v in s["norm_strengths"] if v != 0])
    layers = patch_layers(n_layers, s["patch_layers"])
    # A fit: about 1 s per hook whatever the corpus (nested CV, controls, bootstrap) plus the data:
    # 30.8 / 31.3 s at 12 items (the quick study), 36.7 / 35.9 s at 60 items, 31 hooks.
    fit = (n_layers + 1) * (0.93 + 0.0049 * n_items)
    # unit costs from the default study on a fresh clone (2026-11-24, 2 idle cores, f = 2.13 s)
    est = {
        "capture": 0.33 * f * n_items,
        "fit_surprise": fit,
        "fit_entropy": fit,
        "steer": 0.11 * f * s["steer_inputs"] * (strengths * controls + controls),
        # rows per input through the layers after the hook (about half the model) at every position
        "norm": NORM_ROW_SECONDS * f * s["norm_inputs"] * (3 * (s["random_directions"] + 1) * nonzero
                                                           + (s["norm_random_neurons"] + 1) * len(s["norm_strengths"])),
        "compare": 0.093 * f * s["steer_inputs"] * len(s["compare_strengths"]) * (s["random_directions"] + 1) * 3,
        "patch": 0.0224 * f * s["patch_pairs"] * (s["sample_tokens"] + (2 + s["patch_random_directions"]) * 2
                                                   * len(layers) * len(PATCH_GROUPS)),
        "attribution": 0.0154 * f * (s["patch_pairs"] * (6 + len(layers) * len(PATCH_GROUPS))
                                     + s["token_view_tokens"] * n_layers / 4),
        # each extra temperature of the curve: own answers sampled and read again (about half the stage)
        "gap": 0.024 * f * s["gap_prompts"] * (s["sample_tokens"] + 12) * (1 + 0.5 * extra_temperatures)
               + base_reader_seconds,
        "intention": 0.00244 * f * s["intention_prompts"] * 3 * s["intention_samples"]
                     * s["intention_tokens"] * (2 + len(s["intention_ks"])),
        "report": 5.0,
    }
    return {name: round(value, 1) for name, value in est.items()}


