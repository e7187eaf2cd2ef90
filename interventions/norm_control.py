"""Surprise or the norm? Controls for an entropy effect of steering (issue #27).

Steering along a direction at a middle layer changes output entropy. A model can change entropy
without reordering its logits, by changing the residual stream's norm: the final norm divides
every logit by its scale, a temperature (Stolfo et al. 2024, "Confidence Regulation Neurons",
arXiv 2406.16254). :func:`norm_control` separates the two, on the same inputs and strengths as
the dose-response (``interventions.dose_response``), for the direction and for random directions
of the same norm (``control_directions``: the same seeded directions the steer step uses):

1. **Direct vs total effect.** The entropy slope (nats per std of steering) with nothing frozen
   (``total``), with the final norm's scale frozen at its clean value (``final_norm_frozen``: a
   ``Replace`` on ``ln_final.hook_scale``) and with every norm after the steered layer frozen
   (``later_norms_frozen``: the ``ln1`` / ``ln2`` scales of later blocks and ``ln_final``).
   Each with its sequence-bootstrap CI and z against the random directions under the same
   freezing, and the share of the total slope that survives the freezing (a paired-bootstrap CI
   of the ratio). Also how much the final residual norm (``blocks.{n-1}.hook_resid_post``) and
   the final norm's natural scale (``ln_final.hook_scale`` as the model computes it) move per std.
2. **Geometry** (``interventions.null_space``): the direction's share of squared norm in the
   unembedding's near-null space and its cosine with the mean residual at its hook (mean over the
   scored tokens of the inputs), beside the random directions (what random expects: ``k/d_model``
   and cosine ~0 +/- ``1/sqrt(d_model)``) and, when given, the entropy probe's direction.
3. **Entropy neurons**: the neurons of the last layer(s) with large, mostly-null output weights
   (``entropy_neurons``), then mediation: steer while they are mean-ablated (``Replace`` at
   ``blocks.{L}.mlp.hook_post`` with their mean over the clean inputs' scored tokens) and report the
   fraction of the steering slope that remains, beside as many random neurons of the same layers.

Each input runs alone: one clean forward records what is frozen (every later norm's scale), the
neurons' mean activations and the mean residual; then the conditions run in blocks whose steering
hook fans the sequence out to one row per condition (row 0 clean), as the sweep's fan-out engine.
A condition at strength 0 with nothing ablated is the clean run (freezing at the clean value is
the identity) and is filled from it. Works on a HookedTransformer and a TransformerBridge, on
LayerNorm and RMSNorm models; a model without ``ln_final.hook_scale`` is refused, saying so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from surprise_probe.interventions.dose_response import control_directions
from surprise_probe.interventions.null_space import (
    DEFAULT_NULL_FRACTION,
    entropy_neurons,
    neuron_geometry,
    random_neuron_sets,
    unembedding_null_space,
)
from surprise_probe.interventions.plots import norm_control_figure
from surprise_probe.interventions.steered_metrics import clean_distribution, steered_metrics
from surprise_probe.interventions.steering_sweep import MAX_STEER, encode_items

from surprise_probe.core.forward.directions import from_probe
from surprise_probe.core.forward.edits import Replace, Steer, apply_all
from surprise_probe.core.forward.hooks import (
    FINAL_NORM_SCALE,
    hook_depth,
    mlp_post,
    norm_scale_hooks,
    resid_post,
    resolve_hooks,
)
from surprise_probe.core.forward.passes import logits_only_at
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, ci_text, number_text
from surprise_probe.core.utils.plots import write_html
from surprise_probe.core.utils.progress import tqdm
from surprise_probe.core.utils.stats import (
    MIN_RANDOM_DIRECTIONS,
    bootstrap_sums,
    slope,
    slope_with_ci,
    small_sample_warnings,
    zscore,
)

__all__ = ["NormControlResult", "norm_control", "MODES", "DEFAULT_STRENGTHS"]

MODES = ("total", "final_norm_frozen", "later_norms_frozen")
DEFAULT_STRENGTHS = (-4.0, -2.0, 0.0, 2.0, 4.0)  # the study's steering strengths (std units)
# The bridge warns on every edited hook_scale that it rebuilds the norm's output from the hooked
# values (rounding-level differences); that is what freezing asks for.
_BRIDGE_EDIT_WARNING = "A forward hook edited hook_scale"


@dataclass(repr=False)
class NormControlResult(NotebookView):
    """Direct vs total entropy effect of steering, the direction's geometry, and entropy-neuron mediation.

    ``effects[mode]`` for each of ``MODES``: ``probe_slope`` (nats per std) and ``probe_slope_ci``,
    ``random_slopes`` / ``random_slope_mean`` / ``random_slope_std``, ``z_score``, the probe's mean
    ``entropy`` and ``kl`` (from the clean run) per strength. ``direct_share[mode]``: slope under
    that freezing / total slope, with CI. ``norm_change``: slopes per std (total mode) of the final
    residual norm and of the final norm's scale, absolute and relative to clean, for the probe and
    the random directions. ``geometry``: null-space shares and cosines with the mean residual.
    ``entropy_neurons``: the neurons found; ``neuron_scatter``: norm and share of every neuron of
    those layers; ``mediation``: the remaining fraction (or None when not run, see ``warnings``).
    """

    model_id: str
    hook: str
    std: float
    positions: str
    strengths: list[float]
    normalization_type: str | None
    frozen_hooks: dict[str, list[str]]
    effects: dict[str, dict]
    direct_share: dict[str, dict]
    norm_change: dict
    geometry: dict
    entropy_neurons: list[dict]
    neuron_scatter: dict[str, dict]
    mediation: dict | None
    clean_entropy: float
    n_sequences: int
    n_tokens: int
    level: float
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        n_random = len(self.effects["total"]["random_slopes"])
        lines = small_sample_warnings(random_directions=n_random or None, units=self.n_sequences) + list(self.notes)
        sets = len(self.mediation["random_remaining"]) if self.mediation else 0
        if 0 < sets < MIN_RANDOM_DIRECTIONS:
            lines.append(f"mediation z from {sets} random neuron sets: too few to trust; use at least "
                         f"{MIN_RANDOM_DIRECTIONS}")
        return lines

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready values, plus ``warnings`` and software versions."""
        return {"command": "norm_control", **asdict(self), "warnings": self.warnings,
                "software_versions": software_versions()}

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [("steered", f"{self.hook}, {self.positions} positions, std {number_text(self.std)} "
                            f"({self.normalization_type} model)")]
        for mode in MODES:
            effect = self.effects[mode]
            text = (f"{ci_text(effect['probe_slope'], *effect['probe_slope_ci'], digits=4)} nats/std, random "
                    f"{number_text(effect['random_slope_mean'], 4)} +/- {number_text(effect['random_slope_std'], 4)}, "
                    f"z {number_text(effect['z_score'], 2)}")
            if mode in self.direct_share:
                share = self.direct_share[mode]
                text += f"; share of total {ci_text(share['value'], share['low'], share['high'])}"
            rows.append((f"entropy slope, {mode.replace('_', ' ')}", text))
        scale = self.norm_change["final_scale"]
        rows.append(("final norm scale per std", f"{ci_text(scale['relative_slope'], *scale['relative_slope_ci'], 4)}"
                                                 f" of clean (random |.| {number_text(scale['random_abs_relative_mean'], 4)})"))
        probe, random = self.geometry["probe"], self.geometry["random"]
        rows.append(("null-space share", f"{number_text(probe['null_share'], 4)} (random {number_text(random['null_share_mean'], 4)}"
                                          f" +/- {number_text(random['null_share_std'], 4)}, expected "
                                          f"{number_text(self.geometry['null_space']['expected_random_share'], 4)})"))
        rows.append(("cosine with mean residual", f"{number_text(probe['cos_mean_residual'])} (random "
                                                  f"{number_text(random['cos_mean_residual_mean'])} +/- "
                                                  f"{number_text(random['cos_mean_residual_std'])})"))
        if self.mediation:
            med = self.mediation
            rows.append(("slope remaining, entropy neurons ablated",
                         f"{ci_text(med['remaining'], med['remaining_low'], med['remaining_high'])} "
                         f"({len(self.entropy_neurons)} neurons; random sets {number_text(med['random_remaining_mean'])}"
                         f" +/- {number_text(med['random_remaining_std'])})"))
        rows.append(("sample", f"{self.n_sequences} sequences, {self.n_tokens} scored tokens"))
        rows += [("warning", note) for note in self.warnings[:3]]
        total, final = self.effects["total"], self.effects["final_norm_frozen"]
        return (f"total {number_text(total['probe_slope'], 4)} nats/std (z {number_text(total['z_score'], 2)}), "
                f"final norm frozen {number_text(final['probe_slope'], 4)} (z {number_text(final['z_score'], 2)}) at "
                f"{self.hook}, {self.n_sequences} sequences"), rows

    def summary(self) -> str:
        """The rows of the notebook view as text lines."""
        return "\n".join(f"{label}: {value}" for label, value in self._view()[1])

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``norm_control.html`` and ``norm_control.json`` (last) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return {"html": write_html(norm_control_figure(self), folder / "norm_control.html"),
                "json": write_json(folder / "norm_control.json", self.to_dict())}


def _observer(stored: dict, key: str, canonical: str, scored: torch.Tensor, reduce):
    """A hook that sums ``reduce(activation)`` over the scored positions, per row (canonical call only)."""

    def hook_fn(activation, hook):
        if hook.name is not None and hook.name != canonical:
            return None
        values = reduce(activation.float())  # (rows, pos)
        stored[key] = (values * scored.to(values.device)).sum(-1).double().cpu()
        return None

    return hook_fn


@torch.no_grad()
def _clean_pass(model, encoded, frozen: list[str], mean_hooks: list[str], neuron_layers: list[int], progress: bool):
    """Per sequence, the clean scales at ``frozen``; over the scored tokens of all inputs, the mean
    residual at ``mean_hooks`` and the mean activation of each neuron layer's neurons."""
    device = model_device(model)
    averaged = [*mean_hooks, *(mlp_post(layer) for layer in neuron_layers)]
    names = set(frozen) | set(averaged)
    scales, sums, n_scored = [], dict.fromkeys(averaged, 0), 0
    for item in tqdm(encoded, desc="clean runs", disable=not progress):
        tokens = torch.as_tensor(item.token_ids, dtype=torch.long, device=device).unsqueeze(0)
        scored = torch.as_tensor(item.scored, dtype=torch.bool, device=device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        scales.append({hook: cache[hook].detach().float().cpu().clone() for hook in frozen})
        for name in averaged:
            sums[name] = sums[name] + cache[name][0][scored].double().sum(0).cpu()
        n_scored += int(scored.sum())
        del cache
    return scales, {name: total / n_scored for name, total in sums.items()}


def _slope_ratio(strengths, numerator, denominator, counts, *, n_boot, level, seed) -> dict:
    """Slope of ``numerator`` over slope of ``denominator`` (token-weighted means per strength),
    with a CI from resampling sequences (both slopes from the same resample)."""

    def statistic(top, bottom, count):
        return (slope(strengths, np.moveaxis(top / count, 0, -1))
                / slope(strengths, np.moveaxis(bottom / count, 0, -1)))

    value, low, high = bootstrap_sums(statistic, numerator, denominator, counts, n_boot=n_boot, level=level, seed=seed)
    return {"value": value, "low": low, "high": high}


def _slope_summary(strengths, sums, counts, *, n_boot, level, seed) -> dict:
    """Probe slope [CI] and the random rows' slopes of ``sums`` (n_dir, n_strength, n_seq)."""
    means = sums.sum(-1) / counts.sum()
    slopes = slope(strengths, means)
    ci = slope_with_ci(strengths, sums[0], counts, n_boot=n_boot, level=level, seed=seed)
    random = slopes[1:]
    return {"probe_slope": float(slopes[0]), "probe_slope_ci": [ci.low, ci.high], "random_slopes": random.tolist(),
            "random_slope_mean": float(random.mean()) if len(random) else float("nan"),
            "random_slope_std": float(random.std(ddof=1)) if len(random) > 1 else float("nan"),
            "z_score": zscore(float(slopes[0]), random)}


def _row_interventions(rows: list, hook: str, std: float, vectors, strengths, where, later: list[str],
                       scales: dict, neuron_sets: list, means: dict, d_mlp: int) -> list:
    """One forward's edits, one batch row per condition ``(mode, direction, strength, neuron set)``:
    the steering (fanning the sequence out to the rows), the frozen scales of the rows whose mode
    freezes them, and the mean ablation of each row's neuron set."""
    n_rows, n_pos = len(rows), len(where)
    amount = torch.tensor([0.0 if j is None else float(strengths[j]) for _, _, j, _ in rows])
    mode = torch.tensor([m for m, *_ in rows])
    edits = [Steer(hooks=hook, direction=vectors[[i for _, i, _, _ in rows]], strength=amount, scale=std,
                   positions=where.expand(n_rows, -1), fan_out=n_rows),
             Replace(hooks=FINAL_NORM_SCALE, value=scales[FINAL_NORM_SCALE],
                     positions=(mode >= MODES.index("final_norm_frozen"))[:, None].expand(-1, n_pos))]
    if len(later) > 1:
        edits.append(Replace(hooks=later[:-1], value=scales,
                             positions=(mode == MODES.index("later_norms_frozen"))[:, None].expand(-1, n_pos)))
    for layer in sorted({v for neurons in neuron_sets for v, _ in neurons}):
        units = torch.zeros(n_rows, d_mlp, dtype=torch.bool)
        for r, (_, _, _, a) in enumerate(rows):
            if a >= 0:
                units[r, [index for v, index in neuron_sets[a] if v == layer]] = True
        if units.any():
            edits.append(Replace(hooks=mlp_post(layer), value=means[mlp_post(layer)], units=units))
    return edits


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a @ b) / (a.norm(dim=-1) * b.norm())


def norm_control(
    model,
    direction,
    items: Sequence,
    *,
    layer: int | None = None,
    hook: str | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    n_random: int = MIN_RANDOM_DIRECTIONS,
    positions: str = "response",
    entropy_direction=None,
    null_k: int | None = None,
    null_fraction: float = DEFAULT_NULL_FRACTION,
    neuron_layers: Sequence[int] | None = None,
    n_neurons: int = 10,
    n_random_neurons: int = MIN_RANDOM_DIRECTIONS,
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: bool = True,
) -> NormControlResult:
    """Is the entropy effect of steering along ``direction`` a change of the residual norm? See module doc.

    ``direction``: a ``ProbeDirection`` (checked against the model) or a ``SteeringDirection``;
    it is steered at its hook, or at ``blocks.{layer}.hook_resid_post`` / ``hook`` when given, by
    ``strength * std * d`` at the scored positions (``positions="response"``) or every position
    (``"all"``). ``items``: texts, conversations or ``Encoded``. ``n_random``: random directions
    (the steer step's, same ``seed``). ``entropy_direction``: the entropy probe's direction, for
    the geometry only. ``null_k`` / ``null_fraction``: size of the near-null space (default 1% of
    d_model). ``neuron_layers`` (default the last layer), ``n_neurons`` (0: no mediation),
    ``n_random_neurons`` random neuron sets. Every forward has at most ``batch_size`` rows and
    ``max_batch_tokens`` tokens (a longer input still runs, with one condition per forward).

    >>> from surprise_probe.testing import tiny_model
    >>> from surprise_probe.interventions import SteeringDirection, random_directions
    >>> model = tiny_model()
    >>> d = SteeringDirection(random_directions(model.cfg.d_model, 1, seed=3)[0], "blocks.0.hook_resid_post", 1.0)
    >>> result = norm_control(model, d, ["A cat sat on the mat.", "Rain fell."], strengths=[-1.0, 0.0, 1.0],
    ...                       n_random=2, n_neurons=2, n_random_neurons=2, n_boot=20, progress=False)
    >>> result.frozen_hooks["later_norms_frozen"]
    ['blocks.1.ln1.hook_scale', 'blocks.1.ln2.hook_scale', 'ln_final.hook_scale']
    >>> sorted(result.effects), result.mediation is not None
    (['final_norm_frozen', 'later_norms_frozen', 'total'], True)
    """
    if hook is not None and layer is not None:
        raise ValueError("pass layer= or hook=, not both")
    steering = from_probe(model, direction, hook=resid_post(layer) if layer is not None else hook)
    hook = resolve_hooks(model, hooks=[steering.hook])[0]
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
    strengths = np.asarray([float(s) for s in strengths], dtype=np.float64)
    if len(set(strengths.tolist())) < 2 or not np.isfinite(strengths).all():
        raise ValueError(f"need at least two distinct finite strengths, got {strengths.tolist()}")
    if np.abs(strengths).max() * steering.std >= MAX_STEER:
        raise ValueError(f"|strength| * std reaches {np.abs(strengths).max() * steering.std:.3g}, which overflows "
                         f"the float32 norm of the activation; use smaller strengths")
    later = norm_scale_hooks(model, after=hook)
    frozen_hooks = {"total": [], "final_norm_frozen": [FINAL_NORM_SCALE], "later_norms_frozen": later}
    encoded = encode_items(model, items)
    vectors, labels = control_directions(steering, n_random, seed, orthogonal=False)
    n_layers = int(model.cfg.n_layers)
    final_resid = resid_post(n_layers - 1)
    notes = []

    null = unembedding_null_space(model, k=null_k, fraction=null_fraction)
    layers = [n_layers - 1] if neuron_layers is None else sorted({int(v) % n_layers for v in neuron_layers})
    found = entropy_neurons(model, null, layers, n_neurons) if n_neurons > 0 else []
    mediated = [v for v in layers if hook_depth(mlp_post(v)) >= hook_depth(hook)]
    if found and len(mediated) < len(layers):
        notes.append(f"no mediation: the entropy-neuron layer(s) {sorted(set(layers) - set(mediated))} come before "
                     f"the steered hook {hook}, so ablating them cannot carry its effect")
    run_mediation = bool(found) and len(mediated) == len(layers)
    neuron_sets = [[(n.layer, n.index) for n in found]] if run_mediation else []
    neuron_sets += random_neuron_sets(model, found, n_random_neurons, seed) if run_mediation else []

    extra = None
    mean_hooks = [hook]
    if entropy_direction is not None:
        extra = from_probe(model, entropy_direction)
        mean_hooks.append(extra.hook)
    scales, means = _clean_pass(model, encoded, later, sorted(set(mean_hooks)), layers if run_mediation else [],
                                progress)

    # Conditions: (mode, direction, strength, neuron set or -1); the steering ones, then mediation
    # (the probe, no freezing, every strength including 0).
    n_mode, n_dir, n_str, n_seq = len(MODES), len(vectors), len(strengths), len(encoded)
    conditions = [(m, i, j, -1) for m in range(n_mode) for i in range(n_dir) for j in range(n_str) if strengths[j] != 0]
    conditions += [(0, 0, j, a) for a in range(len(neuron_sets)) for j in range(n_str)]
    # per condition and sequence: entropy, KL, final residual norm, natural final scale (sums)
    sums = np.zeros((len(conditions), 4, n_seq))
    clean = np.zeros((4, n_seq))
    n_tokens = np.array([int(e.scored.sum()) for e in encoded], dtype=np.float64)
    d_mlp = int(model.cfg.d_mlp) if run_mediation else 0
    device = model_device(model)
    canonical = {name: model.hook_dict[name].name or name for name in (FINAL_NORM_SCALE, final_resid)}
    rows_per_seq = [max(2, min(batch_size, max_batch_tokens // max(1, len(e)))) for e in encoded]
    bar = tqdm(total=sum(-(-len(conditions) // (r - 1)) for r in rows_per_seq), desc="norm control", unit="fwd",
               disable=not progress)
    for s, item in enumerate(encoded):
        tokens = torch.as_tensor(item.token_ids, dtype=torch.long, device=device).unsqueeze(0)
        scored = torch.as_tensor(item.scored, dtype=torch.bool)
        where = scored if positions == "response" else torch.ones_like(scored)
        columns = torch.nonzero(scored).squeeze(-1)
        clean_lp = None
        step = rows_per_seq[s] - 1
        for start in range(0, len(conditions), step):
            block = conditions[start : start + step]
            rows = [(0, 0, None, -1), *block]  # row 0: the clean run (no strength)
            interventions = _row_interventions(rows, hook, steering.std, vectors, strengths, where, later, scales[s],
                                               neuron_sets, means, d_mlp)
            stored = {}
            scale_obs = [(FINAL_NORM_SCALE, _observer(stored, "scale", canonical[FINAL_NORM_SCALE], scored,
                                                      lambda x: x[..., 0]))]
            resid_obs = [(final_resid, _observer(stored, "norm", canonical[final_resid], scored,
                                                 lambda x: x.norm(dim=-1)))]
            # only the scored positions are unembedded (after every norm hook): logits (rows, scored, vocab)
            with warnings.catch_warnings(), model.hooks(fwd_hooks=scale_obs), apply_all(model, interventions), \
                    model.hooks(fwd_hooks=resid_obs), logits_only_at(model, columns) as keep, torch.no_grad():
                warnings.filterwarnings("ignore", message=_BRIDGE_EDIT_WARNING)
                logits = model(tokens, return_type="logits", **keep)
            if logits.shape[0] != len(rows):
                raise RuntimeError(f"fanning out at {hook} gave {logits.shape[0]} rows instead of {len(rows)}")
            if clean_lp is None:
                selected = logits[0]
                if not torch.isfinite(selected).all():
                    raise ValueError(f"input {s} gives non-finite logits even without intervention")
                clean_lp, clean_top1, clean_entropy = clean_distribution(selected)
                clean[:, s] = [float(clean_entropy.double().sum()), 0.0, float(stored["norm"][0]),
                               float(stored["scale"][0])]
            for r, (m, i, j, a) in enumerate(block, start=1):
                entropy, kl, _, finite = steered_metrics(logits[r], clean_lp, clean_top1)
                if not finite.all():
                    raise ValueError(f"strength={strengths[j]:g} on {labels[i]!r} ({MODES[m]}, neuron set {a}) gave "
                                     f"non-finite logits for input {s}; use smaller strengths")
                sums[start + r - 1, :, s] = [float(entropy.double().sum()), float(kl.double().sum()),
                                             float(stored["norm"][r]), float(stored["scale"][r])]
            bar.update()
            del logits
    bar.close()

    # Assemble (mode, direction, strength, seq) arrays; strength 0 without ablation is the clean run.
    grid = np.repeat(clean[:, None, None, None, :], n_mode, 1).repeat(n_dir, 2).repeat(n_str, 3)
    for c, (m, i, j, a) in enumerate(conditions):
        if a < 0:
            grid[:, m, i, j] = sums[c]
    options = {"n_boot": n_boot, "level": level, "seed": seed}
    effects = {}
    for m, name in enumerate(MODES):
        effect = _slope_summary(strengths, grid[0, m], n_tokens, **options)
        effect["entropy"] = (grid[0, m, 0].sum(-1) / n_tokens.sum()).tolist()
        effect["kl"] = (grid[1, m, 0].sum(-1) / n_tokens.sum()).tolist()
        effects[name] = effect
    direct_share = {name: _slope_ratio(strengths, grid[0, m, 0], grid[0, 0, 0], n_tokens, **options)
                    for m, name in enumerate(MODES) if m > 0}
    norm_change = {}
    for key, index in (("final_residual_norm", 2), ("final_scale", 3)):
        summary = _slope_summary(strengths, grid[index, 0], n_tokens, **options)
        clean_mean = float(clean[index].sum() / n_tokens.sum())
        summary.update(clean_mean=clean_mean, relative_slope=summary["probe_slope"] / clean_mean,
                       relative_slope_ci=[v / clean_mean for v in summary["probe_slope_ci"]],
                       random_abs_relative_mean=float(np.mean(np.abs(summary["random_slopes"])) / clean_mean)
                       if n_random else float("nan"))
        norm_change[key] = summary
    norm_change["hooks"] = {"final_residual_norm": final_resid, "final_scale": FINAL_NORM_SCALE}

    mediation = None
    if run_mediation:
        med = np.zeros((len(neuron_sets), n_str, n_seq))
        for c, (_, _, j, a) in enumerate(conditions):
            if a >= 0:
                med[a, j] = sums[c, 0]
        total = grid[0, 0, 0]
        ratio = _slope_ratio(strengths, med[0], total, n_tokens, **options)
        total_slope = float(slope(strengths, total.sum(-1) / n_tokens.sum()))
        random_remaining = (slope(strengths, med[1:].sum(-1) / n_tokens.sum()) / total_slope).tolist() \
            if len(neuron_sets) > 1 else []
        mediation = {"remaining": ratio["value"], "remaining_low": ratio["low"], "remaining_high": ratio["high"],
                     "ablated_slope": float(slope(strengths, med[0].sum(-1) / n_tokens.sum())),
                     "ablated_clean_entropy": float(med[0, list(strengths).index(0.0)].sum() / n_tokens.sum())
                     if 0.0 in strengths else None,
                     "random_sets": neuron_sets[1:], "random_remaining": random_remaining,
                     "random_remaining_mean": float(np.mean(random_remaining)) if random_remaining else float("nan"),
                     "random_remaining_std": float(np.std(random_remaining, ddof=1))
                     if len(random_remaining) > 1 else float("nan"),
                     "z_score": zscore(ratio["value"], np.asarray(random_remaining)),
                     "ablation": "mean over the clean inputs' scored tokens, written at every position"}

    # Geometry: null-space share and cosine with the mean residual at each direction's hook.
    mean_resid = means[hook].float()
    probe_share, random_share = null.share(vectors[0]), null.share(vectors[1:])
    cos_random = _cosine(vectors[1:], mean_resid)
    geometry = {
        "null_space": null.to_dict(),
        "hook": hook,
        "mean_residual_norm": float(mean_resid.norm()),
        "mean_residual_null_share": float(null.share(mean_resid)),
        "probe": {"null_share": float(probe_share), "cos_mean_residual": float(_cosine(vectors[0], mean_resid))},
        "random": {"null_share": random_share.tolist(), "cos_mean_residual": cos_random.tolist(),
                   "null_share_mean": float(random_share.mean()) if n_random else float("nan"),
                   "null_share_std": float(random_share.std()) if n_random > 1 else float("nan"),
                   "cos_mean_residual_mean": float(cos_random.mean()) if n_random else float("nan"),
                   "cos_mean_residual_std": float(cos_random.std()) if n_random > 1 else float("nan"),
                   "cos_expected_std": float(int(model.cfg.d_model) ** -0.5)},
        "entropy_probe": None if extra is None else {
            "hook": extra.hook, "null_share": float(null.share(extra.direction)),
            "cos_mean_residual": float(_cosine(extra.direction, means[extra.hook].float())),
            "cos_probe": float(_cosine(extra.direction, vectors[0]))},
    }
    scatter = {}
    for v in layers if found else []:
        norms, shares = neuron_geometry(model, v, null)
        scatter[str(v)] = {"norm": norms.tolist(), "share": shares.tolist()}
    return NormControlResult(
        model_id=model_id(model), hook=hook, std=steering.std, positions=positions, strengths=strengths.tolist(),
        normalization_type=getattr(model.cfg, "normalization_type", None), frozen_hooks=frozen_hooks,
        effects=effects, direct_share=direct_share, norm_change=norm_change, geometry=geometry,
        entropy_neurons=[n.to_dict() for n in found], neuron_scatter=scatter, mediation=mediation,
        clean_entropy=float(clean[0].sum() / n_tokens.sum()), n_sequences=n_seq, n_tokens=int(n_tokens.sum()),
        level=level, notes=notes,
        config={"strengths": "std units of the direction's projection", "n_random": n_random, "seed": seed,
                "n_boot": n_boot, "null_k": null.k, "null_fraction": null_fraction, "neuron_layers": layers,
                "n_neurons": n_neurons, "n_random_neurons": n_random_neurons, "positions": positions,
                "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                "neuron_rule": "top n_neurons by ||W_out[i]|| * null-space share of W_out[i]"},
    )
