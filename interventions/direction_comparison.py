"""Is it the surprise direction, or would any entropy-related direction do the same?

:func:`entropy_direction_comparison` steers along the surprise probe's direction and along the
entropy probe's direction (at the entropy probe's best hook, and at the surprise probe's hook),
each through the same dose-response machinery (``interventions.dose_response``: strengths in
units of that direction's own projection std, random directions of the same size as controls),
and reports side by side: the entropy slope (nats per std, sequence-bootstrap CI, z against the
random directions), the KL(steered || clean) cost and the top-1 agreement at every strength, the
entropy change per nat of KL, and the cosine between every pair of directions.

:func:`compare_directions` does the same for any named set of probe directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from surprise_probe.interventions.dose_response import DoseResponse, dose_response

from surprise_probe.core.models.loading import model_id
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, TableRows, ci_text, number_text
from surprise_probe.core.utils.plots import write_html

__all__ = [
    "DirectionComparison",
    "compare_directions",
    "entropy_direction_comparison",
    "direction_comparison_figure",
]

DEFAULT_STRENGTHS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)


@dataclass(repr=False)
class DirectionComparison(NotebookView):
    """Dose-responses of several directions on the same inputs, with their cosines."""

    model_id: str
    labels: list[str]
    hooks: list[str]
    stds: list[float]
    strengths: list[float]
    responses: list[DoseResponse] = field(repr=False)
    cosines: list[list[float]]  # between the unit directions (one residual-stream basis for all hooks)
    config: dict = field(default_factory=dict)

    def summary_rows(self) -> list[dict]:
        """Per direction: slope [CI], z, KL and top-1 at the largest |strength|, entropy change per KL."""
        rows = []
        strengths = np.asarray(self.strengths)
        top = np.flatnonzero(np.abs(strengths) == np.abs(strengths).max())
        for label, hook, std, response in zip(self.labels, self.hooks, self.stds, self.responses, strict=True):
            entropy, kl = np.asarray(response.entropy[0]), np.asarray(response.kl[0])
            change = np.abs(entropy - response.clean_entropy)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_kl = float(change[top].sum() / kl[top].sum())
            rows.append(
                {
                    "label": label,
                    "hook": hook,
                    "std": std,
                    "entropy_slope": response.probe_slope,
                    "entropy_slope_ci": list(response.probe_slope_ci),
                    "z_vs_random": response.z_score,
                    "random_slope_mean": response.random_slope_mean,
                    "random_slope_std": response.random_slope_std,
                    "kl_at_max_strength": [float(kl[i]) for i in top],
                    "top1_at_max_strength": [float(response.top1_agreement[0][i]) for i in top],
                    "abs_entropy_change_per_nat_kl_at_max_strength": per_kl,
                }
            )
        return rows

    def table(self) -> list[dict]:
        """One plain dict per direction (the same rows as :meth:`summary_rows`)."""
        return TableRows(self.summary_rows())

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [(f"{row['label']} at {row['hook']}",
                 f"slope {ci_text(row['entropy_slope'], *row['entropy_slope_ci'], digits=4)} nats/std, "
                 f"z {number_text(row['z_vs_random'], 2)}") for row in self.summary_rows()]
        sizes = self.responses[0] if self.responses else None
        sample = "n/a" if sizes is None else f"{sizes.n_sequences} sequences, {sizes.n_tokens} scored tokens"
        rows += [("strengths (std)", ", ".join(f"{v:g}" for v in self.strengths)), ("sample", sample)]
        if len(self.labels) > 1:
            rows.append((f"cosine {self.labels[0]} . {self.labels[1]}", number_text(self.cosines[0][1])))
        return f"{len(self.labels)} directions ({', '.join(self.labels)}), {sample}", rows

    def to_dict(self) -> dict:
        """The JSON: summary rows, cosines, every dose-response, sample sizes, config, versions."""
        return {
            "model_id": self.model_id,
            "labels": self.labels,
            "hooks": self.hooks,
            "stds": self.stds,
            "strengths": self.strengths,
            "cosines": self.cosines,
            "summary": self.summary_rows(),
            "dose_responses": {label: r.to_dict() for label, r in zip(self.labels, self.responses, strict=True)},
            "n_sequences": self.responses[0].n_sequences,
            "n_tokens": self.responses[0].n_tokens,
            "config": self.config,
            "software_versions": software_versions(),
        }

    def to_markdown(self) -> str:
        lines = [
            "| direction | hook | entropy slope (nats/std) [95% CI] | z vs random | KL at max strength | top-1 at max | |ΔH| per nat KL |",
            "|---|---|---|---:|---|---|---:|",
        ]
        for row in self.summary_rows():
            low, high = row["entropy_slope_ci"]
            lines.append(
                f"| {row['label']} | `{row['hook']}` | {row['entropy_slope']:+.4f} [{low:+.4f}, {high:+.4f}] | "
                f"{row['z_vs_random']:.2f} | {', '.join(f'{v:.3f}' for v in row['kl_at_max_strength'])} | "
                f"{', '.join(f'{v:.3f}' for v in row['top1_at_max_strength'])} | "
                f"{row['abs_entropy_change_per_nat_kl_at_max_strength']:.2f} |"
            )
        lines.append("")
        lines.append("cosines: " + "; ".join(
            f"{self.labels[i]} · {self.labels[j]} = {self.cosines[i][j]:+.3f}"
            for i in range(len(self.labels)) for j in range(i + 1, len(self.labels))
        ))
        return "\n".join(lines)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """``direction_comparison.json`` and ``direction_comparison.html`` in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        html = write_html(direction_comparison_figure(self), folder / "direction_comparison.html")
        return {"html": html, "json": write_json(folder / "direction_comparison.json", self.to_dict())}


def compare_directions(
    model,
    items: Sequence,
    directions: Mapping[str, object],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    *,
    random_directions: int = 4,
    positions: str = "response",
    batch_size: int = 32,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = True,
) -> DirectionComparison:
    """Dose-response of each named probe direction (``ProbeDirection``-like) on the same ``items``."""
    if len(directions) < 2:
        raise ValueError(f"compare at least two directions, got {list(directions)}")
    strengths = [float(s) for s in strengths]
    responses = [
        dose_response(
            model, items, direction, strengths, random_directions=random_directions, orthogonal=False,
            positions=positions, batch_size=batch_size, seed=seed, n_boot=n_boot, progress=progress,
        )
        for direction in directions.values()
    ]
    units = [np.asarray(d.direction, np.float64) / np.linalg.norm(d.direction) for d in directions.values()]
    cosines = [[float(a @ b) for b in units] for a in units]
    return DirectionComparison(
        model_id=model_id(model),
        labels=list(directions),
        hooks=[d.hook for d in directions.values()],
        stds=[float(d.std) for d in directions.values()],
        strengths=strengths,
        responses=responses,
        cosines=cosines,
        config={
            "strengths": "in units of each direction's own projection std on its training tokens",
            "random_directions": random_directions,
            "positions": positions,
            "seed": seed,
            "n_boot": n_boot,
        },
    )


def entropy_direction_comparison(
    model,
    items: Sequence,
    surprise_direction,
    entropy,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    **options,
) -> DirectionComparison:
    """Steer along the surprise direction and the entropy probe's directions; compare them.

    ``surprise_direction``: the surprise probe's ``ProbeDirection``. ``entropy``: the entropy
    probe sweep (a ``SweepResult`` fitted on output entropy), from which the directions at its
    best hook and at the surprise probe's hook are taken (one if they coincide); or a mapping
    label -> ``ProbeDirection``. ``options`` go to :func:`compare_directions`.

    >>> import numpy as np
    >>> import surprise_probe as sp
    >>> from surprise_probe.probes import fit_sweep
    >>> from surprise_probe.testing import TINY_CORPUS, tiny_model
    >>> model = tiny_model()
    >>> run = sp.capture(model, TINY_CORPUS * 2, progress=False)
    >>> fits = {t: fit_sweep(run, t, n_folds=3, n_shuffles=0, n_boot=20, nested=False, progress=False)
    ...         for t in ("surprise", "entropy")}
    >>> result = entropy_direction_comparison(model, TINY_CORPUS[:2], fits["surprise"].direction(),
    ...     fits["entropy"], [-1.0, 0.0, 1.0], random_directions=2, n_boot=20, progress=False)
    >>> result.labels[0], len(result.summary_rows()) == len(result.labels)
    ('surprise', True)
    """
    directions = {"surprise": surprise_direction}
    if isinstance(entropy, Mapping):
        directions.update(entropy)
    else:
        best = entropy.best_hook()
        directions[f"entropy (best hook, {best})"] = entropy.direction(best)
        if surprise_direction.hook != best:
            directions[f"entropy (surprise hook, {surprise_direction.hook})"] = entropy.direction(
                surprise_direction.hook
            )
    return compare_directions(model, items, directions, strengths, **options)


def direction_comparison_figure(result: DirectionComparison) -> go.Figure:
    """Mean output entropy, KL from clean and top-1 agreement against strength, one line per direction."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "mean output entropy (nats)", "KL(steered ‖ clean) (nats)", "top-1 agreement with clean"))
    palette = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd"]
    dashes = ["solid", "dash", "dashdot", "dot", "longdash"]
    for i, (label, response) in enumerate(zip(result.labels, result.responses, strict=True)):
        style = {"color": palette[i % len(palette)], "dash": dashes[i % len(dashes)]}
        for col, values in enumerate((response.entropy[0], response.kl[0], response.top1_agreement[0]), start=1):
            fig.add_trace(
                go.Scatter(x=result.strengths, y=values, mode="lines+markers", name=label, legendgroup=label,
                           showlegend=col == 1, line=style),
                row=1, col=col,
            )
        random_rows = response.rows("random")
        if random_rows:
            mean = np.asarray(response.entropy)[random_rows].mean(0)
            name = f"random directions at {response.hook}"
            fig.add_trace(
                go.Scatter(x=result.strengths, y=mean, mode="lines", name=name, legendgroup=name,
                           line={"color": "#7f7f7f", "dash": dashes[i % len(dashes)], "width": 1}),
                row=1, col=1,
            )
    fig.update_xaxes(title_text="strength (std of each direction's projection)")
    first = result.responses[0]
    fig.update_layout(
        title=f"Entropy vs surprise direction — {result.model_id} ({first.n_sequences} sequences, {first.n_tokens} tokens)",
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "top", "y": -0.2},
    )
    return fig
