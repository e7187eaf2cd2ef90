"""Dose-response of steering along a direction, and directional ablation, against controls.

Dose-response: add ``strength * std * d`` (strength in units of the projection's std on the probe's
training data) and measure, over the scored span, the mean output entropy, the mean
KL(steered || clean) and the top-1 agreement with the clean run. The same sweep runs for ``k``
random unit directions and one random direction orthogonal to ``d``, at the same magnitudes
``strength * std``. The effect is the slope of mean entropy on strength (nats per std), with a CI from
resampling sequences, and a z-score of the probe's slope against the random directions' slopes.

Ablation: project ``d`` out at the chosen positions and report the change in mean entropy (and the
KL from clean), against the same controls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from surprise_probe.interventions.steering_sweep import SweepTable, encode_items, run_sweep

from surprise_probe.core.forward.directions import (
    SteeringDirection,
    from_probe,
    orthogonal_direction,
    random_directions,
)
from surprise_probe.core.utils.notebook import NotebookView, TableRows, ci_text, number_text
from surprise_probe.core.utils.stats import (
    MIN_RANDOM_DIRECTIONS,
    ratio_with_ci,
    slope,
    slope_with_ci,
    zscore,
)

__all__ = ["DoseResponse", "Ablation", "dose_response", "directional_ablation", "control_directions"]


@dataclass(repr=False)
class DoseResponse(NotebookView):
    """Means over the scored span per direction (rows of ``labels``) and steering strength.

    Fields: ``labels`` the directions (``"probe"``, ``"orthogonal"``, ``"random 0"``, ...), one row
    each of ``entropy`` (token-weighted mean output entropy, nats), ``kl`` (mean KL(steered ||
    clean)) and ``top1_agreement`` (fraction of scored tokens whose top-1 token is unchanged),
    one column per ``strengths`` value (in std units of the probe's projection, scale ``std``).
    ``slopes``: least-squares entropy slope of each row over strength; ``probe_slope`` with its
    sequence-bootstrap ``probe_slope_ci``; ``z_score`` = (probe slope - mean of the random slopes)
    / their std. ``n_sequences`` / ``n_tokens``: the sample. ``table()`` flattens it, one dict per
    direction x strength; ``rows("random")`` indexes the random controls.

    >>> from surprise_probe.testing import tiny_model
    >>> from surprise_probe.interventions import SteeringDirection, random_directions
    >>> model = tiny_model()
    >>> d = SteeringDirection(random_directions(model.cfg.d_model, 1, seed=3)[0], "blocks.1.hook_resid_post", 1.0)
    >>> result = dose_response(model, ["A cat sat on the mat.", "Rain fell."], d, [-2.0, 0.0, 2.0],
    ...                        random_directions=2, n_boot=20, progress=False)
    >>> result.labels, result.strengths
    (['probe', 'orthogonal', 'random 0', 'random 1'], [-2.0, 0.0, 2.0])
    >>> result.kl[0][1], result.rows("random"), len(result.table())
    (0.0, [2, 3], 12)
    """

    hook: str
    std: float
    positions: str
    strengths: list[float]  # in std units of the probe's projection
    labels: list[str]  # "probe", "orthogonal", "random 0", ...
    entropy: list[list[float]]  # (n_dir, n_strength) token-weighted mean output entropy, nats
    kl: list[list[float]]  # mean KL(steered || clean), nats
    top1_agreement: list[list[float]]  # fraction of scored tokens whose top-1 matches clean
    probe_entropy_ci: list[tuple[float, float]]  # per strength, sequence-bootstrap CI
    clean_entropy: float
    slopes: list[float]  # entropy slope per direction, nats per std
    probe_slope: float
    probe_slope_ci: tuple[float, float]
    random_slope_mean: float
    random_slope_std: float
    z_score: float  # probe slope against the random directions' slopes
    n_sequences: int
    n_tokens: int
    level: float
    n_forwards: int

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready values."""
        return asdict(self)

    def rows(self, prefix: str) -> list[int]:
        """Indices of the directions whose label starts with ``prefix`` (e.g. ``"random"``)."""
        return [i for i, label in enumerate(self.labels) if label.startswith(prefix)]

    def table(self) -> list[dict]:
        """One plain dict per direction x strength: mean entropy, KL from clean, top-1 agreement."""
        return TableRows(
            {"direction": label, "strength": strength, "entropy": self.entropy[i][j], "kl": self.kl[i][j],
             "top1_agreement": self.top1_agreement[i][j], "slope": self.slopes[i]}
            for i, label in enumerate(self.labels)
            for j, strength in enumerate(self.strengths)
        )

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        slope = ci_text(self.probe_slope, *self.probe_slope_ci, digits=4)
        n_random = len(self.rows("random"))
        rows = [("steered", f"{self.labels[0]} at {self.hook}, {self.positions} positions, std {number_text(self.std)}"),
                ("strengths (std)", ", ".join(f"{v:g}" for v in self.strengths)),
                ("clean entropy", f"{number_text(self.clean_entropy)} nats"),
                (f"entropy slope ({self.level:.0%} CI)", f"{slope} nats per std"),
                ("random directions", f"{n_random}: slope {number_text(self.random_slope_mean, 4)} "
                                      f"+/- {number_text(self.random_slope_std, 4)}"),
                ("z vs random", number_text(self.z_score, 2)),
                ("sample", f"{self.n_sequences} sequences, {self.n_tokens} scored tokens")]
        return (f"slope {slope} nats/std at {self.hook}, z {number_text(self.z_score, 2)} vs {n_random} random, "
                f"{self.n_sequences} sequences, {self.n_tokens} tokens"), rows


@dataclass(repr=False)
class Ablation(NotebookView):
    """Entropy change when each direction is projected out (ablated minus clean)."""

    hook: str
    positions: str
    labels: list[str]
    entropy_change: list[float]  # mean over scored tokens, nats
    kl: list[float]
    top1_agreement: list[float]
    probe_change_ci: tuple[float, float]
    clean_entropy: float
    random_change_mean: float
    random_change_std: float
    z_score: float
    n_sequences: int
    n_tokens: int
    level: float

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready values."""
        return asdict(self)

    def table(self) -> list[dict]:
        """One plain dict per direction: entropy change, KL and top-1 agreement when ablated."""
        return TableRows(
            {"direction": label, "entropy_change": change, "kl": kl, "top1_agreement": top1}
            for label, change, kl, top1 in zip(self.labels, self.entropy_change, self.kl, self.top1_agreement,
                                                strict=True)
        )

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        change = ci_text(self.entropy_change[0], *self.probe_change_ci, digits=4)
        rows = [("ablated", f"{self.labels[0]} at {self.hook}, {self.positions} positions"),
                ("clean entropy", f"{number_text(self.clean_entropy)} nats"),
                (f"entropy change ({self.level:.0%} CI)", f"{change} nats"),
                ("random directions", f"{sum(label.startswith('random') for label in self.labels)}: change "
                                      f"{number_text(self.random_change_mean, 4)} +/- {number_text(self.random_change_std, 4)}"),
                ("z vs random", number_text(self.z_score, 2)),
                ("sample", f"{self.n_sequences} sequences, {self.n_tokens} scored tokens")]
        return (f"entropy change {change} nats at {self.hook}, z {number_text(self.z_score, 2)}, "
                f"{self.n_sequences} sequences, {self.n_tokens} tokens"), rows


def control_directions(direction: SteeringDirection, k: int, seed: int, orthogonal: bool = True):
    """The probe direction, one orthogonal control and ``k`` random controls, with labels."""
    vectors = [direction.direction.reshape(1, -1)]
    labels = ["probe"]
    if orthogonal:
        vectors.append(orthogonal_direction(direction.direction, seed).reshape(1, -1))
        labels.append("orthogonal")
    if k:
        vectors.append(random_directions(direction.direction.numel(), k, seed))
        labels += [f"random {i}" for i in range(k)]
    return torch.cat(vectors), labels


def _direction(model, probe) -> SteeringDirection:
    return from_probe(model, probe)


def dose_response(
    model,
    items: Sequence,
    probe,
    strengths: Sequence[float],
    *,
    random_directions: int = MIN_RANDOM_DIRECTIONS,
    orthogonal: bool = True,
    positions: str = "response",
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    batched: bool = True,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: bool = True,
) -> DoseResponse:
    """Sweep ``strengths`` (std units) along the probe direction and the control directions.

    ``probe``: a ``probes.ProbeDirection`` (checked against the model) or a
    :class:`SteeringDirection`. ``items``: texts / conversations / ``Encoded``. At most
    ``batch_size`` rows and ``max_batch_tokens`` tokens go through any forward (see ``run_sweep``).
    """
    direction = _direction(model, probe)
    encoded = encode_items(model, items)
    strengths = [float(a) for a in strengths]
    if len(set(strengths)) < 2:
        raise ValueError(f"a dose-response needs at least two distinct strengths, got {strengths}")
    vectors, labels = control_directions(direction, random_directions, seed, orthogonal)
    table = run_sweep(
        model, encoded, direction.hook, vectors, strengths, labels=labels, kind="steer",
        scale=direction.std, positions=positions, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        batched=batched, progress=progress,
    )
    return summarise_dose_response(table, direction, positions, n_boot=n_boot, level=level, seed=seed)


def summarise_dose_response(
    table: SweepTable, direction: SteeringDirection, positions: str, *, n_boot: int, level: float, seed: int
) -> DoseResponse:
    strengths = table.amounts
    entropy = table.mean("entropy")
    slopes = slope(strengths, entropy)
    probe = slope_with_ci(
        strengths, table.entropy[0], table.n_tokens, n_boot=n_boot, level=level, seed=seed
    )
    probe_slope, low, high = probe.value, probe.low, probe.high
    random_rows = [i for i, label in enumerate(table.labels) if label.startswith("random")]
    random_slopes = slopes[random_rows]
    ci = []
    for j in range(len(strengths)):
        mean = ratio_with_ci(table.entropy[0, j], table.n_tokens, n_boot=n_boot, level=level, seed=seed)
        ci.append((mean.low, mean.high))
    return DoseResponse(
        hook=direction.hook,
        std=direction.std,
        positions=positions,
        strengths=strengths.tolist(),
        labels=list(table.labels),
        entropy=entropy.tolist(),
        kl=table.mean("kl").tolist(),
        top1_agreement=table.mean("agree").tolist(),
        probe_entropy_ci=ci,
        clean_entropy=float(table.clean_entropy.sum() / table.n_tokens.sum()),
        slopes=slopes.tolist(),
        probe_slope=probe_slope,
        probe_slope_ci=(low, high),
        random_slope_mean=float(random_slopes.mean()) if len(random_slopes) else float("nan"),
        random_slope_std=float(random_slopes.std(ddof=1)) if len(random_slopes) > 1 else float("nan"),
        z_score=zscore(probe_slope, random_slopes),
        n_sequences=len(table.n_tokens),
        n_tokens=int(table.n_tokens.sum()),
        level=level,
        n_forwards=table.n_forwards,
    )


def directional_ablation(
    model,
    items: Sequence,
    probe,
    *,
    random_directions: int = MIN_RANDOM_DIRECTIONS,
    orthogonal: bool = True,
    positions: str = "response",
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: bool = True,
) -> Ablation:
    """Project the direction (and each control) out and measure the change in mean entropy."""
    direction = _direction(model, probe)
    encoded = encode_items(model, items)
    vectors, labels = control_directions(direction, random_directions, seed, orthogonal)
    table = run_sweep(
        model, encoded, direction.hook, vectors, [1.0], labels=labels, kind="ablate",
        positions=positions, batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress,
    )
    n_tokens = table.n_tokens.sum()
    change = (table.entropy[:, 0].sum(-1) - table.clean_entropy.sum()) / n_tokens
    probe_change = ratio_with_ci(
        table.entropy[0, 0] - table.clean_entropy, table.n_tokens, n_boot=n_boot, level=level, seed=seed
    )
    low, high = probe_change.low, probe_change.high
    random_rows = [i for i, label in enumerate(labels) if label.startswith("random")]
    random_changes = change[random_rows]
    return Ablation(
        hook=direction.hook,
        positions=positions,
        labels=labels,
        entropy_change=change.tolist(),
        kl=table.mean("kl")[:, 0].tolist(),
        top1_agreement=table.mean("agree")[:, 0].tolist(),
        probe_change_ci=(low, high),
        clean_entropy=float(table.clean_entropy.sum() / n_tokens),
        random_change_mean=float(random_changes.mean()) if len(random_changes) else float("nan"),
        random_change_std=float(random_changes.std(ddof=1)) if len(random_changes) > 1 else float("nan"),
        z_score=zscore(float(change[0]), random_changes),
        n_sequences=len(table.n_tokens),
        n_tokens=int(n_tokens),
        level=level,
    )
