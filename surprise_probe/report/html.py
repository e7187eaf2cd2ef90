"""One self-contained ``report.html`` for a study: every stage's figure, caption, numbers and JSON.

The report is a list of :class:`StageSection` (title, status, a two-line caption on how to read
the figure, figures, HTML fragments such as the token view, a numbers table with the effect, its
CI, the control beside it and the sample size, and links to the stage's JSON) under a
:class:`ReportHeader` (models, data, versions, date, total time). :func:`write_report_html` writes
it through the project's HTML writer (:func:`surprise_probe.core.utils.plots.write_report`, plotly.js
inlined once), so the file opens offline.

Adapters build sections from what the stages save: :func:`capture_section`
(``capture_summary.json``), :func:`fit_section` (``sweep.json``), :func:`steer_section`
(``steer.json``), :func:`compare_section` (``direction_comparison.json``), :func:`patch_section`
(``patch.json``), :func:`attribution_section` (``attribution.json``), :func:`token_view_section`
(``token_view.json``), :func:`gap_section` (``gap.json``) and :func:`intention_section`
(``intention.json``). Other analyses plug in through :func:`result_section`, or by giving their
result class a ``report_section(json_path)`` method returning a :class:`StageSection`.
:func:`write_study_report` assembles a study folder; a stage that failed or did not run is named
with its error, never left out.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import plotly.graph_objects as go

from surprise_probe.analyses.intention.plots import (
    commitment_figure,
    prefill_figure,
    readout_figure,
)
from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.analyses.token_view import token_view_html
from surprise_probe.core.utils.jsonio import read_json, software_versions
from surprise_probe.core.utils.plots import write_report
from surprise_probe.interventions.attribution import attribution_scatter_figure
from surprise_probe.interventions.direction_comparison import (
    DirectionComparison,
    direction_comparison_figure,
)
from surprise_probe.interventions.dose_response import DoseResponse
from surprise_probe.interventions.plots import (
    ablation_figure,
    dose_response_figure,
    patching_figure,
)
from surprise_probe.probes.plots import SHUFFLE_COLOUR, TOKEN_IDENTITY_COLOUR
from surprise_probe.probes.results import hook_layer

__all__ = [
    "Number",
    "StageSection",
    "ReportHeader",
    "Reportable",
    "write_report_html",
    "write_study_report",
    "study_sections",
    "failed_section",
    "result_section",
    "capture_section",
    "fit_section",
    "steer_section",
    "patch_section",
    "attribution_section",
    "token_view_section",
    "compare_section",
    "gap_section",
    "intention_section",
    "fit_figure",
    "SectionSpec",
]

STATUS_OK = ("ok", "done", "resumed")


@dataclass
class Number:
    """One row of a section's numbers table: an effect with its CI, its control and its sample."""

    measure: str
    value: float | str
    ci: tuple[float, float] | None = None
    control: str = ""  # the control beside the effect, as text (e.g. "random directions 0.01 +/- 0.02")
    n: str = ""  # sample size (e.g. "8 sequences, 412 tokens")
    unit: str = ""

    def cells(self) -> list[str]:
        value = _fmt(self.value) + (f" {self.unit}" if self.unit and _is_number(self.value) else "")
        ci = f"[{_fmt(self.ci[0])}, {_fmt(self.ci[1])}]" if self.ci is not None else "n/a"
        return [self.measure, value, ci, self.control or "", self.n or ""]


@dataclass
class StageSection:
    """What the report shows for one stage. ``status``: ok / done / resumed / failed / skipped / missing."""

    key: str
    title: str
    status: str = "ok"
    caption: str = ""  # two lines: what is plotted; how to read it
    figures: list[go.Figure] = field(default_factory=list)
    fragments: list[str] = field(default_factory=list)  # HTML blocks (e.g. the token view)
    numbers: list[Number] = field(default_factory=list)
    json_paths: list[Path] = field(default_factory=list)
    sample: str = ""  # sample size in words
    error: str = ""
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in STATUS_OK


@dataclass
class ReportHeader:
    """The report's header: models, data, software versions, date and total time."""

    title: str
    models: list[str]
    data: str
    date: str = ""
    total_seconds: float | None = None
    versions: dict = field(default_factory=software_versions)
    notes: str = ""


@runtime_checkable
class Reportable(Protocol):
    """A result that renders itself as a section (e.g. the policy gap or cached intention)."""

    def report_section(self, json_path: Path | None = None) -> StageSection: ...


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if not _is_number(value):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _ci(estimate) -> tuple[float, float] | None:
    if isinstance(estimate, Mapping) and "low" in estimate and "high" in estimate:
        return (estimate["low"], estimate["high"])
    if isinstance(estimate, (list, tuple)) and len(estimate) == 2:
        return (estimate[0], estimate[1])
    return None


def _value(estimate):
    if isinstance(estimate, Mapping):
        return estimate.get("value", estimate.get("mean"))
    return estimate


# --- sections from saved results -------------------------------------------------------------------

def failed_section(key: str, title: str, error: str, status: str = "failed", seconds: float | None = None,
                   json_paths: Sequence[Path] = ()) -> StageSection:
    """A stage that failed / was skipped / did not run: named in the report with its reason."""
    return StageSection(key, title, status=status, error=error or "no reason recorded", seconds=seconds,
                        json_paths=list(json_paths))


def result_section(
    key: str,
    title: str,
    *,
    caption: str,
    figures: Sequence[go.Figure] = (),
    numbers: Sequence[Number] = (),
    json_path: str | Path | None = None,
    sample: str = "",
    fragments: Sequence[str] = (),
    seconds: float | None = None,
) -> StageSection:
    """A section for any analysis (the hook for the policy gap and cached intention stages)."""
    return StageSection(key, title, caption=caption, figures=list(figures), numbers=list(numbers),
                        json_paths=[Path(json_path)] if json_path else [], sample=sample,
                        fragments=list(fragments), seconds=seconds)


def capture_section(folder: str | Path) -> StageSection:
    """From ``capture_summary.json``: mean surprise and entropy over the scored span, with CIs."""
    path = Path(folder) / "capture_summary.json"
    data = read_json(path)
    n = f"{data['n_sequences']} sequences, {data['n_scored_tokens']} scored tokens"
    numbers = []
    for key, label in (("input_surprise", "mean input surprise"), ("output_entropy", "mean output entropy")):
        estimate = data[key]
        numbers.append(Number(label, estimate["mean"], (estimate["low"], estimate["high"]),
                              control="", n=n, unit="nats"))
    layers = data.get("layers") or []
    fig = go.Figure()
    if layers:
        x, ticks = _layer_axis([row["hook"] for row in layers])
        hover = "%{text}<br>r %{y:.3f}<extra></extra>"
        fig.add_trace(go.Scatter(x=x, y=[row["corr_norm_surprise"] for row in layers], mode="lines+markers",
                                 name="r(|resid|, input surprise)", line={"color": "#d62728"},
                                 text=[row["hook"] for row in layers], hovertemplate=hover))
        fig.add_trace(go.Scatter(x=x, y=[row["corr_norm_entropy"] for row in layers], mode="lines+markers",
                                 name="r(|resid|, output entropy)", line={"color": "#1f77b4", "dash": "dash"},
                                 text=[row["hook"] for row in layers], hovertemplate=hover))
        fig.add_hline(y=0, line={"color": "#999", "width": 1})
        fig.update_xaxes(**ticks)
    fig.update_layout(title="First look: correlation of the residual norm with surprise and entropy, per hook",
                      yaxis_title="Pearson r over scored tokens", template="plotly_white",
                      height=380, legend={"orientation": "h", "y": -0.28})
    return StageSection(
        "capture", "Capture: per-token surprise, entropy and activations",
        caption=("What the model read: means over the scored span with sequence-bootstrap CIs, and how the "
                 "residual norm at each hook correlates with surprise and entropy.<br>A norm correlation is only a "
                 "first look; the probes below test linear decodability with controls."),
        figures=[fig] if layers else [], numbers=numbers, json_paths=[path], sample=n,
    )


def _layer_axis(hooks: Sequence[str]) -> tuple[list[float], dict]:
    """x positions and tick labels by layer index (``blocks.L.hook_resid_post`` -> L; the
    embedding ``blocks.0.hook_resid_pre`` -> "embed" left of layer 0); hover shows the hook name."""

    x = []
    for hook in hooks:
        layer = hook_layer(hook)
        x.append(-1.0 if hook.endswith("hook_resid_pre") and layer == 0 else
                 float(layer) - (0.5 if hook.endswith("hook_resid_pre") else 0.0) if layer is not None else float("nan"))
    ticks = sorted({v for v in x if np.isfinite(v)})
    step = max(1, len(ticks) // 16)
    shown = ticks[::step]
    return x, {"tickmode": "array", "tickvals": shown, "ticktext": ["embed" if v == -1 else f"{v:g}" for v in shown],
               "title_text": "layer L = hook blocks.L.hook_resid_post (hover shows the hook)"}


def fit_figure(data: Mapping) -> go.Figure:
    """Held-out R^2 per hook (95% CI band) beside its controls, from a saved ``sweep.json``.

    Red: the probe; dashed red: the probe on the target minus its token-type mean (what the
    activations add beyond the token's identity); grey dashed with a grey band: shuffled labels;
    purple long-dashed line: the token-type mean baseline; purple diamond: the embedding-layer probe
    (both token identity; the colours are those of ``probes.plots.layer_sweep_figure``).
    """
    hooks = [row for row in data["hooks"] if row.get("hook") != "blocks.0.hook_resid_pre"]
    names = [row["hook"] for row in hooks]
    x, ticks = _layer_axis(names)
    r2 = [row["r2"] for row in hooks]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x + x[::-1], y=[e["high"] for e in r2] + [e["low"] for e in r2][::-1],
                             fill="toself", mode="lines", fillcolor="rgba(214,39,40,0.18)", line={"width": 0}, hoverinfo="skip",
                             name="probe 95% CI"))
    fig.add_trace(go.Scatter(x=x, y=[e["value"] for e in r2], mode="lines+markers", name="probe (held-out R²)",
                             line={"color": "#d62728", "width": 3}, text=names,
                             customdata=[[e["low"], e["high"]] for e in r2],
                             hovertemplate="%{text}<br>R² %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"))
    residual = [row.get("residual_r2") for row in hooks]
    if residual and all(isinstance(e, Mapping) for e in residual):
        fig.add_trace(go.Scatter(x=x, y=[e["value"] for e in residual], mode="lines", name="beyond token-type mean",
                                 line={"color": "#d62728", "dash": "dash"}, text=names,
                                 hovertemplate="%{text}<br>R² beyond token mean %{y:.3f}<extra></extra>"))
    shuffled = [(xi, row["shuffle_r2"]) for xi, row in zip(x, hooks, strict=True) if row.get("shuffle_r2")]
    if shuffled:
        sx = [xi for xi, _ in shuffled]
        fig.add_trace(go.Scatter(x=sx + sx[::-1], y=[max(v) for _, v in shuffled] + [min(v) for _, v in shuffled][::-1],
                                 fill="toself", mode="lines", fillcolor="rgba(140,140,140,0.22)", line={"width": 0},
                                 hoverinfo="skip", name="shuffled labels (min..max)", legendgroup="shuffle"))
        fig.add_trace(go.Scatter(x=sx, y=[float(np.mean(v)) for _, v in shuffled], mode="lines",
                                 name="shuffled labels (mean)", legendgroup="shuffle",
                                 line={"color": SHUFFLE_COLOUR, "dash": "dash", "width": 2}))
    controls = data.get("controls") or {}
    token_mean = controls.get("token_mean_r2")
    if _value(token_mean) is not None and x:
        span = [-1, max(x)]
        ci = _ci(token_mean)
        if ci is not None and None not in ci:
            fig.add_trace(go.Scatter(x=span + span[::-1], y=[ci[1], ci[1], ci[0], ci[0]], fill="toself", mode="lines",
                                     fillcolor="rgba(94,43,151,0.14)", line={"width": 0}, hoverinfo="skip",
                                     showlegend=False, legendgroup="token"))
        fig.add_trace(go.Scatter(x=span, y=[_value(token_mean)] * 2, mode="lines", legendgroup="token",
                                 name="token-type mean (token identity)",
                                 line={"color": TOKEN_IDENTITY_COLOUR, "dash": "longdash", "width": 2}))
    embedding = _value(controls.get("embedding_r2"))
    if embedding is not None and x:
        fig.add_trace(go.Scatter(x=[-1], y=[embedding], mode="markers", name="embedding-layer probe",
                                 marker={"symbol": "diamond-open", "size": 13, "color": TOKEN_IDENTITY_COLOUR,
                                         "line": {"width": 2}}))
        ticks["tickvals"] = [-1, *[v for v in ticks["tickvals"] if v != -1]]
        ticks["ticktext"] = ["embed" if v == -1 else f"{v:g}" for v in ticks["tickvals"]]
    fig.update_xaxes(**ticks)
    fig.update_layout(title=f"Decoding {data.get('target', 'the target')} from each layer ({data.get('n_tokens')} "
                            f"tokens, {data.get('n_sequences')} sequences)",
                      yaxis_title="held-out R²", template="plotly_white", height=420,
                      legend={"orientation": "h", "y": -0.28})
    return fig


def fit_section(folder: str | Path, target: str | None = None) -> StageSection:
    """From ``sweep.json``: held-out R^2 by layer; the best layer beside token-identity and shuffle controls."""
    path = Path(folder) / "sweep.json"
    data = read_json(path)
    target = target or data.get("target", "target")
    n = f"{data['n_sequences']} sequences, {data['n_tokens']} tokens"
    best = next((row for row in data["hooks"] if row["hook"] == data.get("best_hook")), None)
    controls = data.get("controls") or {}
    numbers = []
    if best is not None:
        shuffle = best.get("shuffle_r2") or []
        control = "shuffled labels R² " + (f"{_fmt(float(np.mean(shuffle)))} (p = {_fmt(best.get('shuffle_p'))})"
                                           if shuffle else "n/a")
        numbers.append(Number(f"held-out R² at {best['hook']}", best["r2"]["value"], _ci(best["r2"]),
                              control=control, n=n))
        if isinstance(best.get("residual_r2"), Mapping):
            numbers.append(Number("R² beyond the token-type mean", best["residual_r2"]["value"],
                                  _ci(best["residual_r2"]), control="0 if only token identity is decoded", n=n))
    for key, label in (("token_mean_r2", "control: token-type mean R²"), ("embedding_r2", "control: embedding-layer probe R²")):
        if controls.get(key) is not None:
            numbers.append(Number(label, _value(controls[key]), _ci(controls[key]), n=n))
    title = {"surprise": "Probes: decoding input surprise", "entropy": "Probes: decoding output entropy"}.get(
        target, f"Probes: decoding {target}")
    return StageSection(
        f"fit_{target}", title,
        caption=("Held-out R² of a ridge probe at every layer (sequence-grouped CV; band: 95% bootstrap CI over "
                 "sequences).<br>Read the gap between the red curve and the purple token-identity line: that is what the "
                 "residual stream encodes beyond the token's identity; the grey shuffled-label band should sit near 0."),
        figures=[fit_figure(data)], numbers=numbers, json_paths=[path], sample=n,
    )


def steer_section(folder: str | Path) -> StageSection:
    """From ``steer.json``: dose-response and ablation along the probe direction vs random directions."""

    path = Path(folder) / "steer.json"
    data = read_json(path)
    dose = data["dose_response"]
    n = f"{dose['n_sequences']} sequences, {dose['n_tokens']} scored tokens"
    k = len([label for label in dose["labels"] if label.startswith("random")])
    numbers = [Number(
        f"entropy slope along the probe direction at {dose['hook']}", dose["probe_slope"], _ci(dose["probe_slope_ci"]),
        control=f"{k} random directions: {_fmt(dose['random_slope_mean'])} ± {_fmt(dose['random_slope_std'])} "
                f"(z = {_fmt(dose['z_score'])})", n=n, unit="nats/std")]
    figures = [dose_response_figure(dose)]
    ablation = data.get("ablation")
    if ablation:
        numbers.append(Number(
            "entropy change when the direction is projected out", ablation["entropy_change"][0],
            _ci(ablation["probe_change_ci"]),
            control=f"random: {_fmt(ablation['random_change_mean'])} ± {_fmt(ablation['random_change_std'])} "
                    f"(z = {_fmt(ablation['z_score'])})", n=n, unit="nats"))
        figures.append(ablation_figure(ablation))
    return StageSection(
        "steer", "Steering and ablation along the surprise direction",
        caption=("Mean output entropy (and KL, top-1 agreement) as the surprise direction is added at strengths "
                 "in units of its projection's std; grey band: random directions of the same norm.<br>A causal "
                 "effect shows as a red slope outside the grey band; the ablation bar should stand apart from the grey ones."),
        figures=figures, numbers=numbers, json_paths=[path], sample=n,
    )


def patch_section(folder: str | Path) -> StageSection:
    """From ``patch.json``: the fraction of the entropy gap closed per layer and position group."""

    path = Path(folder) / "patch.json"
    data = read_json(path)
    result = data.get("patching", data)
    n = f"{result['n_pairs']} pairs, {result['n_measured_tokens']} measured tokens"
    numbers = []
    groups, hooks = result["groups"], result["hooks"]
    for component in result["components"]:
        fraction = np.asarray(result["fraction"][component], float)
        if not np.isfinite(fraction).any():
            continue
        h, g = np.unravel_index(np.nanargmax(np.abs(fraction)), fraction.shape)
        ci = result["fraction_ci"][component][h][g]
        label = {"direction": "component along d", "all": "whole activation"}.get(component, component)
        controls = []
        if component == "direction" and "all" in result["fraction"]:
            controls.append("whole-activation patch: " + _fmt(result["fraction"]["all"][h][g]))
        if component == "direction" and result.get("random_directions"):
            controls.append(f"{result['random_directions']} random directions: {_fmt(result['random_mean'][h][g])} ± "
                            f"{_fmt(result['random_std'][h][g])} (z = {_fmt(result['z'][h][g])})")
        control = "; ".join(controls)
        numbers.append(Number(f"largest fraction closed ({label}) at {hooks[h]}, {groups[g]}", float(fraction[h, g]),
                              _ci(ci), control=control, n=n))
    return StageSection(
        "patch", "Activation patching along the surprise direction",
        caption=("Fraction of the source-destination entropy gap closed by patching the source's activation into the "
                 "destination, per layer (rows) and position group (columns).<br>1 closes the whole gap, 0 nothing; "
                 "compare the component along d with the whole activation (the upper bound at that layer)."),
        figures=[patching_figure(result)], numbers=numbers, json_paths=[path], sample=n,
    )


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


def token_view_section(source, element_id: str = "token-view") -> StageSection:
    """From ``token_view.json`` (or a ``TokenViewData``): the conversation as coloured text."""

    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "token_view.json" if path.is_dir() else path
        data = read_json(path)
    else:
        data = source.to_dict()
    n = f"{len(data['tokens'])} tokens shown of {data['n_tokens_total']}, {sum(data['scored'])} scored"
    return StageSection(
        "token_view", "Token view: one conversation, token by token",
        caption=("Each token coloured by the chosen quantity; the layer menu recolours the layer-dependent ones "
                 "(decoded surprise, attribution) in place.<br>Hover a token for every value and the model's top-5 "
                 "next tokens; underlined tokens are the scored span."),
        fragments=[token_view_html(data, element_id=element_id)], json_paths=[path] if path else [], sample=n,
    )


def compare_section(folder: str | Path) -> StageSection:
    """From ``direction_comparison.json``: steering along the surprise vs the entropy directions."""

    path = Path(folder) / "direction_comparison.json"
    data = read_json(path)
    n = f"{data['n_sequences']} sequences, {data['n_tokens']} scored tokens"
    numbers = []
    for row in data["summary"]:
        k = data["config"].get("random_directions", "")
        numbers.append(Number(
            f"entropy slope along {row['label']}", row["entropy_slope"], _ci(row["entropy_slope_ci"]),
            control=f"{k} random directions at {row['hook']}: {_fmt(row['random_slope_mean'])} ± "
                    f"{_fmt(row['random_slope_std'])} (z = {_fmt(row['z_vs_random'])})", n=n, unit="nats/std"))
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
        figures=[direction_comparison_figure(result)], numbers=numbers, json_paths=[path], sample=n,
    )


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


class _SavedGap:
    """A saved ``gap.json`` with the attributes the policy-gap figures read."""

    def __init__(self, data: Mapping):
        self.data, self.models, self.summary, self.config = data, data["models"], data["summary"], data["config"]

    def to_dict(self) -> Mapping:
        return self.data


def gap_section(folder: str | Path) -> StageSection:
    """From ``gap.json``: each reader's off/on-policy entropy ratio, beside the base reader's."""

    path = Path(folder) / "gap.json"
    data = read_json(path)
    k = data["config"]["k"]
    kinds = {m["name"]: ("post-trained" if m["post_trained"] else "base" if m["post_trained"] is False else "")
             for m in data["models"]}
    rows = [r for r in data["summary"]["comparisons"] if r["span"].get("n_prompts")]
    numbers = []
    for m in data["models"]:
        fmt = "assistant" if "assistant" in m["formats_read"] else m["formats_read"][0]
        for row in [r for r in rows if r["reader"] == m["name"] and r["format"] == fmt]:
            ratio, auroc = row["span"]["ratio_off_on"], row.get("auroc_entropy") or {}
            others = [r for r in rows if r["reader"] != m["name"] and r["source"] == row["source"]]
            controls = [f"{r['reader']} ({kinds.get(r['reader'], '')}, {r['format']}): "
                        f"{_fmt(r['span']['ratio_off_on']['value'])}" for r in others[:1]]
            plain = [r for r in rows if r["reader"] == m["name"] and r["source"] == row["source"]
                     and r["format"] == "plain" and fmt != "plain"]
            controls += [f"plain format: {_fmt(r['span']['ratio_off_on']['value'])}" for r in plain]
            controls.append(f"AUROC {_fmt(auroc.get('auroc'))} [{_fmt(auroc.get('low'))}, {_fmt(auroc.get('high'))}]")
            numbers.append(Number(
                f"{m['name']} ({kinds[m['name']] or 'kind unknown'}, {fmt} format) reading {row['source']}: "
                "off/on mean entropy", ratio["value"], _ci(ratio), control="; ".join(controls),
                n=f"{row['span']['n_prompts']} prompts"))
    n = f"{data['n_prompts']} prompts, {data['config']['n_samples']} sample(s) each, readers " + ", ".join(
        f"{m['name']} ({kinds[m['name']] or '?'})" for m in data["models"])
    saved = _SavedGap(data)
    figures = [policy_plots.gap_ratios(saved), policy_plots.reader_writer_heatmap(saved),
               policy_plots.entropy_by_position(saved)]
    return StageSection(
        "gap", "Policy gap: on-policy vs off-policy entropy",
        caption=("Each reader's mean output entropy on others' text divided by its entropy on its own sampled "
                 f"answers (95% paired bootstrap CI over prompts; first {k} tokens and AUROC in the JSON).<br>"
                 "1 = no gap; the claim is a ratio well above 1 for a post-trained reader and near 1 for a base "
                 "reader; the plain format is the formatting control."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path], sample=n,
    )


def intention_section(folder: str | Path) -> StageSection:
    """From ``intention.json``: topic entropy before the first token, commitment, readout, prefill."""

    path = Path(folder) / "intention.json"
    data = read_json(path)
    numbers = []
    for m in data["models"]:
        te = m["topic_entropy"]
        n = f"{te['n_prompts']} prompts, {te['n_rows']} phrasings x {te['n_samples']} samples"
        numbers.append(Number(f"{m['model_id']}: topic entropy at k = 0", te["value"], _ci(te),
                              control=f"uniform over the lexicon, same n: {_fmt(m['uniform_reference'])}", n=n,
                              unit="nats"))
        curve = [c for c in m["commitment"] if c.get("value") is not None]
        if curve:
            last = curve[-1]
            numbers.append(Number(f"{m['model_id']}: topic entropy after k = {last['k']} revealed tokens",
                                  last["value"], _ci(last), control=f"k = 0: {_fmt(te['value'])}",
                                  n=f"{last.get('n_rows', '')} phrasings", unit="nats"))
        probe = m["readout"].get("probe")
        if probe:
            best = max(probe, key=lambda row: row["accuracy"])
            shuffled = m["readout"]["shuffled"][probe.index(best)]
            numbers.append(Number(f"{m['model_id']}: topic probe accuracy before the first token (depth {best['depth']})",
                                  best["accuracy"], _ci(best), control=f"shuffled {_fmt(shuffled['accuracy'])}, "
                                  f"majority {_fmt(best['majority'])}", n=f"{m['readout']['n_rows']} phrasings"))
        else:
            numbers.append(Number(f"{m['model_id']}: topic probe", "not fitted",
                                  control=str(m["readout"].get("skipped", ""))))
        prefill = m["prefill"]
        if prefill.get("difference"):
            d = prefill["difference"]
            numbers.append(Number(f"{m['model_id']}: prefill other - own topic, entropy", d["mean"], _ci(d),
                                  control="0 if the topic was not cached",
                                  n=f"{prefill['n_pairs']} pairs, other higher in {prefill['n_other_higher']}",
                                  unit="nats"))
    figures = [commitment_figure(data), readout_figure(data), prefill_figure(data)]
    return StageSection(
        "intention", "Cached intention: has the model chosen its topic before writing?",
        caption=("Topic entropy of sampled answers to open-ended prompts as k tokens of a reference answer are "
                 "revealed (k = 0: before the first output token), a topic probe on the last prompt token, and the "
                 "entropy after an own-topic vs other-topic prefill.<br>A model that has cached its choice starts "
                 "below the uniform line and is more uncertain after an other-topic prefill."),
        figures=[f for f in figures if f.data], numbers=numbers, json_paths=[path],
        sample=f"{data['n_prompts']} prompts, {data['n_phrasings']} phrasings",
    )


# --- the study ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SectionSpec:
    """A report section of a study stage: its key in ``study.json``, title, folder, and reader.

    ``read(folder) -> StageSection`` builds the section from the stage's saved results. The study
    (``surprise_probe.app.study``) gives each of its stages its sections, so the list of stages
    exists once; the report only renders them in the order given.
    """

    key: str
    title: str
    folder: str
    read: Callable[[Path], StageSection] | None
    status_of: str | None = None  # the stage whose status this section shows, when not ``key``


def study_sections(
    out: str | Path,
    sections: Sequence[SectionSpec],
    stages: Mapping[str, Mapping] | None = None,
    extra: Mapping[str, StageSection | Reportable] | None = None,
) -> list[StageSection]:
    """Sections for a study folder, in the order of ``sections``, then any other stage in ``stages``.

    ``stages``: the study's per-stage status (``study.json``'s ``stages``: status, seconds, error);
    read from ``out/study.json`` when not given. ``extra``: sections (or ``Reportable`` results)
    for stages without an adapter here, by stage name (``"gap"``, ``"intention"``). A stage that
    failed, was skipped or whose JSON is missing becomes a section naming why.
    """
    out = Path(out)
    if stages is None:
        stages = read_json(out / "study.json").get("stages", {}) if (out / "study.json").exists() else {}
    extra = dict(extra or {})
    specs, sections = list(sections), []
    known = {spec.key for spec in specs} | {spec.status_of for spec in specs if spec.status_of}
    for spec in specs:
        name, title, folder, adapter = spec.key, spec.title, spec.folder, spec.read
        record = stages.get(name) or stages.get(spec.status_of or name)
        status = (record or {}).get("status")
        seconds = (record or {}).get("seconds")
        if status is not None and status not in STATUS_OK:
            sections.append(failed_section(name, title, (record or {}).get("error", ""), status=status, seconds=seconds))
            continue
        if name in extra:
            section = extra[name]
            section = section.report_section() if isinstance(section, Reportable) else section
            section.seconds = section.seconds if section.seconds is not None else seconds
            sections.append(section)
            continue
        if adapter is None or not (out / folder).is_dir():
            if record is not None:  # recorded as finished, but nothing to show: say so
                sections.append(failed_section(name, title, f"the study recorded {status!r} but {out / folder} "
                                               "has no results this report can read", status="missing", seconds=seconds))
            continue
        try:
            section = adapter(out / folder)
        except Exception as error:  # noqa: BLE001 - one unreadable stage must not take the report down
            sections.append(failed_section(name, title, f"could not read its results: {type(error).__name__}: {error}",
                                           status="missing" if isinstance(error, FileNotFoundError) else "failed",
                                           seconds=seconds))
            continue
        section.seconds = seconds
        sections.append(section)
    for name, record in stages.items():
        if name in known or name == "report":
            continue
        if name in extra:
            section = extra[name]
            sections.append(section.report_section() if isinstance(section, Reportable) else section)
        elif record.get("status") not in STATUS_OK:
            sections.append(failed_section(name, name, record.get("error", ""), status=record.get("status", "failed"),
                                           seconds=record.get("seconds")))
    return sections


def write_study_report(
    out: str | Path,
    *,
    sections: Sequence[SectionSpec],
    stages: Mapping[str, Mapping] | None = None,
    settings: Mapping | None = None,
    total_seconds: float | None = None,
    extra: Mapping[str, StageSection | Reportable] | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write ``out/report.html`` for a study folder (see :func:`study_sections`); returns its path.

    ``sections``: the report sections of the study's stages, in order
    (``surprise_probe.app.study.report_sections()`` for the default study).

    ``settings`` (model name, inputs, ...) and ``stages`` default to those in ``out/study.json``.
    """
    out = Path(out)
    record = read_json(out / "study.json") if (out / "study.json").exists() else {}
    settings = dict(settings if settings is not None else record.get("settings", {}))
    stages = stages if stages is not None else record.get("stages", {})
    if total_seconds is None and stages:
        total_seconds = sum(float(s.get("seconds") or 0) for s in stages.values())
    models = [str(settings[key]) + (" (base reader in the policy gap)" if key == "base_reader" else "")
              for key in ("model", "base_model", "reader", "base_reader") if settings.get(key)]
    header = ReportHeader(
        title=f"surprise-probe study: {', '.join(models) or out.name}",
        models=models or ["(not recorded)"],
        data=str(settings.get("input", "(not recorded)")),
        total_seconds=total_seconds,
        versions=record.get("software_versions") or software_versions(),
        notes=", ".join(f"{k} = {v}" for k, v in settings.items() if k not in ("model", "input") and not isinstance(v, (dict, list)))
    )
    return write_report_html(path or out / "report.html", header, study_sections(out, sections, stages, extra))


# --- rendering ---------------------------------------------------------------------------------------

_CSS = """
<style>
body{max-width:1240px !important;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:26px;margin:18px 0 6px}
.sp-header table{border-collapse:collapse;font-size:14px}.sp-header td{padding:2px 14px 2px 0;vertical-align:top}
.sp-header .versions{font-size:12px;color:#555}
.sp-toc{font-size:14px;margin:10px 0 4px;padding:8px 12px;background:#f6f7f9;border-radius:6px}
.sp-toc a{margin-right:4px}
section{border-top:1px solid #ddd;margin-top:26px;padding-top:4px}
section h2{font-size:20px;margin:12px 0 6px}
.sp-status{display:inline-block;font-size:12px;font-weight:bold;padding:1px 8px;border-radius:10px;margin-left:8px;vertical-align:middle}
.sp-status.ok{background:#e3f4e6;color:#1d6b2c}.sp-status.failed,.sp-status.missing{background:#fde4e1;color:#a11d0f}
.sp-status.skipped{background:#fff1d6;color:#8a5a00}
.sp-caption{font-size:14px;color:#333;margin:4px 0 8px}
.sp-error{background:#fde4e1;border-left:4px solid #c0392b;padding:6px 10px;font-family:monospace;font-size:13px;white-space:pre-wrap}
table.sp-numbers{border-collapse:collapse;font-size:13.5px;margin:6px 0 10px;width:100%}
table.sp-numbers th{text-align:left;background:#f1f3f5;padding:4px 8px;border-bottom:1px solid #ccc}
table.sp-numbers td{padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
.sp-meta{font-size:12.5px;color:#555}
.js-plotly-plot,.plotly-graph-div{max-width:100%}
section:has(> h2:empty){border-top:none;margin-top:4px;padding-top:0}
h2:empty{display:none}
</style>
"""


def _status_badge(status: str) -> str:
    kind = "ok" if status in STATUS_OK else status if status in ("failed", "skipped", "missing") else "failed"
    return f"<span class='sp-status {kind}'>{escape(status)}</span>"


def _relative(path: Path, report: Path) -> str:
    try:
        return Path(path).resolve().relative_to(report.parent.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()


def _numbers_table(numbers: Sequence[Number]) -> str:
    if not numbers:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("measure", "effect", "95% CI", "control beside it", "sample"))
    rows = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in number.cells()) + "</tr>" for number in numbers)
    return f"<table class='sp-numbers'><tr>{head}</tr>{rows}</table>"


def _section_head(section: StageSection, report: Path) -> str:
    parts = [f"<a id='stage-{escape(section.key)}'></a>{_status_badge(section.status)}"]
    if section.caption:
        parts.append(f"<div class='sp-caption'>{section.caption}</div>")
    if section.error:
        parts.append(f"<div class='sp-error'>{escape(section.error)}</div>")
    parts.append(_numbers_table(section.numbers))
    meta = []
    if section.sample:
        meta.append(f"sample: {escape(section.sample)}")
    if section.seconds is not None:
        meta.append(f"time: {section.seconds:.1f} s")
    for path in section.json_paths:
        meta.append(f"<a href='{escape(_relative(path, report))}'>{escape(Path(path).name)}</a>")
    if meta:
        parts.append(f"<div class='sp-meta'>{' · '.join(meta)}</div>")
    return "\n".join(parts)


def _wrap_title(text: str, width: int = 95) -> str:
    if "<br>" in text or len(text) <= width:
        return text
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "<br>".join(lines)


def _fit_width(fig: go.Figure) -> go.Figure:
    """A copy that fills the page width (no fixed pixel width), long titles wrapped, so nothing is clipped."""
    fig = go.Figure(fig)
    title = fig.layout.title.text or ""
    wrapped = _wrap_title(title)
    top = max(fig.layout.margin.t or 80, 60 + 24 * (wrapped.count("<br>") + 1))
    fig.update_layout(width=None, autosize=True, title_text=wrapped or None, margin={"t": top})
    return fig


def write_report_html(path: str | Path, header: ReportHeader, sections: Iterable[StageSection]) -> Path:
    """Write the report (header, contents, one block per section) as one self-contained page."""
    path = Path(path)
    sections = list(sections)
    date = header.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = f"{header.total_seconds:.0f} s ({header.total_seconds / 60:.1f} min)" if header.total_seconds else "n/a"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(header.versions.items()))
    failed = [s for s in sections if not s.ok]
    rows = [("models", ", ".join(header.models)), ("data", header.data), ("date", date), ("total time", total),
            ("stages", f"{len(sections) - len(failed)} of {len(sections)} ok"
                       + (f"; not ok: {', '.join(s.title for s in failed)}" if failed else ""))]
    if header.notes:
        rows.append(("settings", header.notes))
    key_rows = "".join(
        f"<tr><td><a href='#stage-{escape(s.key)}'>{escape(s.title)}</a></td>"
        + "".join(f"<td>{escape(cell)}</td>" for cell in s.numbers[0].cells()) + "</tr>"
        for s in sections if s.ok and s.numbers)
    key_numbers = ("<h2 style='font-size:18px;margin:14px 0 4px'>Key numbers</h2><table class='sp-numbers'><tr>"
                   + "".join(f"<th>{h}</th>" for h in ("stage", "measure", "effect", "95% CI", "control beside it",
                                                       "sample"))
                   + f"</tr>{key_rows}</table>") if key_rows else ""
    toc = " · ".join(f"<a href='#stage-{escape(s.key)}'>{escape(s.title)}</a>{'' if s.ok else ' (' + escape(s.status) + ')'}"
                     for s in sections)
    intro = (
        _CSS + "<div class='sp-header'><table>"
        + "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(v)}</td></tr>" for k, v in rows)
        + f"</table><div class='versions'>software: {escape(versions)}</div></div>"
        + f"<div class='sp-toc'>{toc}</div>" + key_numbers
    )
    blocks: list[tuple[str, go.Figure | str]] = []
    for section in sections:
        blocks.append((section.title, _section_head(section, path)))
        for fragment in section.fragments:
            blocks.append(("", fragment))
        for fig in section.figures:
            blocks.append(("", _fit_width(fig)))
    return write_report(blocks, path, header.title, intro)
