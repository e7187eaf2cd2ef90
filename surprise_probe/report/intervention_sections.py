"""Report sections for the interventions: steering, direction comparison, patching, attribution.

:func:`steer_section` reads ``steer.json``, :func:`compare_section` ``direction_comparison.json``,
:func:`patch_section` ``patch.json`` and :func:`attribution_section` ``attribution.json``; each
puts the effect beside its random-direction (or exact-patching) control.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from surprise_probe.core.utils.jsonio import read_json
from surprise_probe.core.utils.stats import small_sample_warnings
from surprise_probe.interventions.attribution import attribution_scatter_figure
from surprise_probe.interventions.direction_comparison import (
    DirectionComparison,
    direction_comparison_figure,
)
from surprise_probe.interventions.dose_response import DoseResponse
from surprise_probe.interventions.plots import (
    ablation_figure,
    dose_response_figure,
    norm_control_figure,
    patching_figure,
)
from surprise_probe.report.values import Number, StageSection, _ci, _fmt
from surprise_probe.report.verdicts import patching_cell

__all__ = ["steer_section", "norm_section", "compare_section", "patch_section", "attribution_section"]


def _caveat(control: str, *, random_directions: int | None = None, units: int | None = None,
            unit_name: str = "sequences") -> str:
    """``control``, followed by the toolkit's own small-sample warning where one applies."""
    notes = small_sample_warnings(random_directions=random_directions, units=units, unit_name=unit_name)
    return "; ".join([control, *(f"caveat: {note}" for note in notes)]) if control else "; ".join(notes)


def steer_section(folder: str | Path) -> StageSection:
    """From ``steer.json``: dose-response and ablation along the probe direction vs random directions."""

    path = Path(folder) / "steer.json"
    data = read_json(path)
    dose = data["dose_response"]
    n = f"{dose['n_sequences']} sequences, {dose['n_tokens']} scored tokens"
    k = len([label for label in dose["labels"] if label.startswith("random")])
    numbers = [Number(
        f"entropy slope along the probe direction at {dose['hook']}", dose["probe_slope"], _ci(dose["probe_slope_ci"]),
        control=_caveat(f"{k} random directions: {_fmt(dose['random_slope_mean'])} ± {_fmt(dose['random_slope_std'])} "
                        f"(z = {_fmt(dose['z_score'])})", random_directions=k, units=dose["n_sequences"]),
        n=n, unit="nats/std")]
    figures = [dose_response_figure(dose)]
    ablation = data.get("ablation")
    if ablation:
        k_ablation = len([label for label in ablation["labels"] if label.startswith("random")])
        numbers.append(Number(
            "entropy change when the direction is projected out", ablation["entropy_change"][0],
            _ci(ablation["probe_change_ci"]),
            control=_caveat(f"random: {_fmt(ablation['random_change_mean'])} ± {_fmt(ablation['random_change_std'])} "
                            f"(z = {_fmt(ablation['z_score'])})", random_directions=k_ablation,
                            units=ablation["n_sequences"]),
            n=n, unit="nats"))
        figures.append(ablation_figure(ablation))
    return StageSection(
        "steer", "Steering and ablation along the surprise direction",
        caption=("Mean output entropy (and KL, top-1 agreement) as the surprise direction is added at strengths "
                 "in units of its projection's std; grey band: random directions of the same norm.<br>A causal "
                 "effect shows as a red slope outside the grey band; the ablation bar should stand apart from the grey ones."),
        figures=figures, numbers=numbers, json_paths=[path], sample=n,
    )


_MODE_TEXT = {"total": "entropy slope, norms free (total effect)",
              "final_norm_frozen": "entropy slope, final norm's scale frozen at its clean value (direct effect)",
              "later_norms_frozen": "entropy slope, every norm after the steered layer frozen"}


def norm_section(folder: str | Path) -> StageSection:
    """From ``norm_control.json``: is steering's entropy effect a change of the residual norm?

    The slope with norms free, with the final norm frozen and with every later norm frozen (each
    against random directions under the same freezing), how much the norm moves, the direction's
    near-null-space share and mean-residual cosine, and the entropy neurons' mediation."""
    path = Path(folder) / "norm_control.json"
    data = read_json(path)
    n_seq = data["n_sequences"]
    n = f"{n_seq} sequences, {data['n_tokens']} scored tokens"
    numbers = []
    for mode, text in _MODE_TEXT.items():
        effect = data["effects"][mode]
        k = len(effect["random_slopes"])
        share = (data.get("direct_share") or {}).get(mode)
        control = (f"{k} random directions, same freezing: {_fmt(effect['random_slope_mean'])} ± "
                   f"{_fmt(effect['random_slope_std'])} (z = {_fmt(effect['z_score'])})")
        if share:
            control += f"; share of the total slope {_fmt(share['value'])} [{_fmt(share['low'])}, {_fmt(share['high'])}]"
        numbers.append(Number(f"{text} at {data['hook']}", effect["probe_slope"], _ci(effect["probe_slope_ci"]),
                              control=_caveat(control, random_directions=k, units=n_seq), n=n, unit="nats/std"))
    scale = data["norm_change"]["final_scale"]
    numbers.append(Number(
        "final norm's scale, change per std of steering (fraction of its clean value)", scale["relative_slope"],
        _ci(scale["relative_slope_ci"]), control=f"random directions: |change| {_fmt(scale['random_abs_relative_mean'])} "
        f"on average (z = {_fmt(scale['z_score'])})", n=n))
    geometry = data["geometry"]
    null, random = geometry["null_space"], geometry["random"]
    numbers.append(Number(
        f"share of the direction in W_U's near-null space ({null['k']} smallest singular directions)",
        geometry["probe"]["null_share"], None,
        control=f"random directions {_fmt(random.get('null_share_mean'))} ± {_fmt(random.get('null_share_std'))} "
                f"(expected {_fmt(null['expected_random_share'])})", n=f"1 direction, {len(random.get('null_share', []))} random"))
    numbers.append(Number(
        "cosine of the direction with the mean residual at its hook", geometry["probe"]["cos_mean_residual"], None,
        control=f"random directions {_fmt(random.get('cos_mean_residual_mean'))} ± "
                f"{_fmt(random.get('cos_mean_residual_std'))}", n=n))
    mediation = data.get("mediation")
    if mediation:
        numbers.append(Number(
            f"share of the slope left with {len(data['entropy_neurons'])} entropy neurons mean-ablated",
            mediation["remaining"], (mediation["remaining_low"], mediation["remaining_high"]),
            control=f"{len(mediation['random_remaining'])} random neuron sets of the same layer: "
                    f"{_fmt(mediation['random_remaining_mean'])} ± {_fmt(mediation['random_remaining_std'])} "
                    f"(z = {_fmt(mediation.get('z_score'))})", n=n))
    return StageSection(
        "norm", "Surprise or the norm? Steering with the layer norms frozen",
        caption=("The entropy slope of steering along the surprise direction with every norm free (total), with the "
                 "final norm's scale frozen at its clean value, and with every later norm frozen; grey points: "
                 "random directions under the same freezing. Geometry: the direction's share in W_U's near-null "
                 "space and its cosine with the mean residual; entropy neurons: the final layer's neurons with a "
                 "large output norm in that space, mean-ablated while steering.<br>A representation of surprise "
                 "keeps its slope with the norms frozen; an effect carried by the norm (the final norm turning a "
                 "larger residual into a temperature) falls to the random directions' level when they are frozen."),
        figures=[norm_control_figure(data)], numbers=numbers, json_paths=[path], sample=n,
    )


def patch_section(folder: str | Path) -> StageSection:
    """From ``patch.json``: the fraction of the entropy gap closed per layer and position group.

    The first number is the cell the patching verdict reads (the probe's layer, all response
    positions); the largest fraction over all cells follows when it is elsewhere. The whole
    activation is the control beside them, never a number of its own: patching every position
    that differs closes the whole gap by construction.
    """

    path = Path(folder) / "patch.json"
    data = read_json(path)
    result = data.get("patching", data)
    n = f"{result['n_pairs']} pairs, {result['n_measured_tokens']} measured tokens"
    groups, hooks = result["groups"], result["hooks"]
    numbers = []
    if "direction" in result["fraction"]:
        fraction = np.asarray(result["fraction"]["direction"], float)
        cells = [patching_cell(result)]
        if np.isfinite(fraction).any():
            best = tuple(int(i) for i in np.unravel_index(np.nanargmax(fraction), fraction.shape))
            cells += [best] if best != cells[0] else []
        for i, (h, g) in enumerate(cells):
            where = ("the probe's layer" if hooks[h] == result.get("direction_hook") else "the patched layer nearest "
                     "the probe's") if i == 0 else f"the largest of {fraction.size} cells, chosen after looking"
            numbers.append(Number(
                f"fraction of the gap closed by the component along d at {hooks[h]}, {groups[g]} ({where})",
                float(fraction[h, g]), _ci(result["fraction_ci"]["direction"][h][g]),
                control=_patch_control(result, h, g), n=n))
    return StageSection(
        "patch", "Activation patching along the surprise direction",
        caption=("Fraction of the source-destination entropy gap closed by patching the source's activation into the "
                 "destination, per layer (rows) and position group (columns).<br>1 closes the whole gap, 0 nothing; "
                 "compare the component along d with the whole activation (the upper bound at that layer: 1 by "
                 "construction where every position that differs is patched)."),
        figures=[patching_figure(result)], numbers=numbers, json_paths=[path], sample=n,
    )


def _patch_control(result: Mapping, h: int, g: int) -> str:
    controls = []
    k = result.get("random_directions") or 0
    if k:
        controls.append(f"{k} random directions: {_fmt(result['random_mean'][h][g])} ± "
                        f"{_fmt(result['random_std'][h][g])} (z = {_fmt(result['z'][h][g])})")
    if "all" in result["fraction"]:
        whole, (low, high) = result["fraction"]["all"][h][g], result["fraction_ci"]["all"][h][g]
        fixed = whole is not None and abs(whole - 1) < 1e-9 and low == high  # 1 in every resample
        controls.append(f"whole activation there: {_fmt(whole)}"
                        + (" by construction (every position that differs is replaced)" if fixed
                           else f" [{_fmt(low)}, {_fmt(high)}] (the upper bound at that layer)"))
    return _caveat("; ".join(controls), random_directions=k, units=result["n_pairs"], unit_name="pairs")


def attribution_section(source) -> StageSection:
    """From ``attribution.json`` (or an ``AttributionPatching``): estimate vs exact patching scatter."""

    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "attribution.json" if path.is_dir() else path
        data = read_json(path)
    else:
        data = source.to_dict()
    n = f"{data['n_pairs']} pairs x {len(data['hooks'])} hooks x {len(data['groups'])} groups"
    numbers = []
    if data.get("exact") is not None:
        numbers.append(Number("Pearson r, first-order estimate vs exact patch", data["pearson_r"],
                              _ci(data["pearson_r_ci"]), control="1 = the estimate ranks and scales like exact patching",
                              n=f"{data['n_points']} points ({n})"))
    return StageSection(
        "attribution", "Attribution patching, validated against exact patching",
        caption=("Each point is one pair x layer x position group: exact patch of the component along d (x) against "
                 "the gradient estimate from one forward and one backward pass (y).<br>Points on the dashed diagonal "
                 "mean the cheap estimate can stand in for exact patching; CI is a Fisher-z interval over points."),
        figures=[attribution_scatter_figure(data)] if data.get("exact") is not None else [],
        numbers=numbers, json_paths=[path] if path else [], sample=n,
    )


def compare_section(folder: str | Path) -> StageSection:
    """From ``direction_comparison.json``: steering along the surprise vs the entropy directions."""

    path = Path(folder) / "direction_comparison.json"
    data = read_json(path)
    n = f"{data['n_sequences']} sequences, {data['n_tokens']} scored tokens"
    numbers = []
    k = int(data["config"].get("random_directions") or 0)
    for row in data["summary"]:
        numbers.append(Number(
            f"entropy slope along {row['label']}", row["entropy_slope"], _ci(row["entropy_slope_ci"]),
            control=_caveat(f"{k} random directions at {row['hook']}: {_fmt(row['random_slope_mean'])} ± "
                            f"{_fmt(row['random_slope_std'])} (z = {_fmt(row['z_vs_random'])})", random_directions=k,
                            units=data["n_sequences"]), n=n, unit="nats/std"))
    labels = data["labels"]
    cosines = "; ".join(f"cos({labels[i]}, {labels[j]}) = {_fmt(data['cosines'][i][j])}"
                        for i in range(len(labels)) for j in range(i + 1, len(labels)))
    result = DirectionComparison(
        model_id=data["model_id"], labels=labels, hooks=data["hooks"], stds=data["stds"],
        strengths=data["strengths"], cosines=data["cosines"], config=data["config"],
        responses=[_dose_response(DoseResponse, data["dose_responses"][label]) for label in labels])
    return StageSection(
        "compare", "Surprise direction vs entropy directions",
        caption=("The same dose-response along the surprise probe's direction and the entropy probe's directions "
                 f"(each in units of its own projection std); {escape(cosines)}.<br>If the entropy direction moves "
                 "entropy as much per nat of KL, the surprise direction is not special; grey: random directions."),
        figures=[_one_entry_per_control(direction_comparison_figure(result), labels)], numbers=numbers,
        json_paths=[path], sample=n,
    )


def _one_entry_per_control(fig: go.Figure, labels: list[str]) -> go.Figure:
    """Name each direction's random-direction line after its direction: two directions at one hook
    (the surprise and the entropy probe at the surprise layer) would list "random directions at
    <hook>" twice in the legend."""
    direction = None
    for trace in fig.data:
        if trace.name in labels:
            direction = trace.name
        elif direction and (trace.name or "").startswith("random directions"):
            trace.name = trace.legendgroup = f"random directions for {direction}"
    return fig


def _nan_for_none(value):
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return value


def _dose_response(cls, saved: Mapping):
    """A ``DoseResponse`` back from its JSON (null -> NaN, CI pairs -> tuples)."""
    fields = {k: (v if k in ("hook", "positions", "labels") else _nan_for_none(v)) for k, v in saved.items()}
    fields["probe_entropy_ci"] = [tuple(pair) for pair in fields["probe_entropy_ci"]]
    fields["probe_slope_ci"] = tuple(fields["probe_slope_ci"])
    return cls(**fields)
