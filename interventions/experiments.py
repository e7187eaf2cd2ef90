"""The steer and patch steps as library calls: run, then ``save(folder)`` (JSON + offline HTML).

:func:`steering_experiment` runs the dose-response along a probe direction (with random and
orthogonal controls), the directional ablation, and optionally steered samples;
:func:`patching_experiment` runs activation patching between paired reads. Both results cite
the probe artifact they used (path and sha256 of its files) and the software versions.

>>> import tempfile, numpy as np
>>> from surprise_probe.probes import ProbeDirection
>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> d = np.ones(model.cfg.d_model) / np.sqrt(model.cfg.d_model)
>>> probe = ProbeDirection(d, mean=0.0, std=1.0, hook="blocks.1.hook_resid_post", layer=1,
...                        model_id=model.cfg.model_name, d_model=model.cfg.d_model, target="surprise")
>>> result = steering_experiment(model, ["A cat sat on the mat."], probe, [-1.0, 0.0, 1.0],
...                              random_directions=2, n_boot=20, progress=False)
>>> sorted(result.save(tempfile.mkdtemp()))
['ablation_html', 'dose_response_html', 'json']
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from surprise_probe.interventions.dose_response import (
    Ablation,
    DoseResponse,
    directional_ablation,
    dose_response,
)
from surprise_probe.interventions.patching import PatchingResult, activation_patching
from surprise_probe.interventions.plots import (
    ablation_figure,
    dose_response_figure,
    patching_figure,
)
from surprise_probe.interventions.steered_generation import generate

from surprise_probe.core.forward.directions import from_probe
from surprise_probe.core.forward.edits import Steer, resid_hooks
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.encoding import encode_all
from surprise_probe.core.utils.jsonio import read_json, software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView
from surprise_probe.core.utils.plots import write_html
from surprise_probe.core.utils.stats import MIN_RANDOM_DIRECTIONS, small_sample_warnings

__all__ = [
    "SteeringExperiment",
    "PatchingExperiment",
    "steering_experiment",
    "patching_experiment",
    "probe_artifact",
]

_ARTIFACT_SUFFIXES = (".json", ".npz", ".safetensors")


def probe_artifact(path: str | Path | None) -> dict:
    """Path and sha256 of a saved probe artifact (every file of it: weights and metadata).

    ``ProbeDirection.save`` writes canonical bytes, so the same probe gives the same hashes.
    ``verified``: whether its JSON carries the artifact hash that ``ProbeDirection.load`` checks
    (False only for a probe used with ``allow_unverified=True``).
    """
    if path is None:
        return {"path": None, "sha256": None, "files": {}, "verified": None}
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in _ARTIFACT_SUFFIXES else path
    files = {}
    for suffix in _ARTIFACT_SUFFIXES:
        file = stem.with_name(stem.name + suffix)
        if file.exists():
            files[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    whole = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in sorted(files.items())).encode())
    meta = stem.with_name(stem.name + ".json")
    try:
        verified = "artifact_sha256" in read_json(meta)
    except (OSError, ValueError, TypeError):
        verified = False
    return {"path": str(stem), "sha256": whole.hexdigest(), "files": files, "verified": verified}


@dataclass(repr=False)
class SteeringExperiment(NotebookView):
    """Dose-response (and ablation, and samples) along one probe direction, with its provenance."""

    model_id: str
    probe: dict  # path and sha256 of the artifact
    dose_response: DoseResponse
    ablation: Ablation | None
    samples: list[dict]
    config: dict = field(default_factory=dict)
    probe_caveats: list[str] = field(default_factory=list)  # ProbeDirection.caveats() of the steered probe

    def to_dict(self) -> dict:
        return {
            "command": "steer",
            "model_id": self.model_id,
            "probe": self.probe,
            "config": self.config,
            "dose_response": self.dose_response.to_dict(),
            "ablation": None if self.ablation is None else self.ablation.to_dict(),
            "samples": self.samples,
            "n_sequences": self.dose_response.n_sequences,
            "n_tokens": self.dose_response.n_tokens,
            "warnings": self.warnings(),
            "software_versions": software_versions(),
        }

    def warnings(self) -> list[str]:
        """Samples too small to trust (random directions behind the z, sequences behind the CIs), and
        why the probe itself may not be worth steering with (its recorded controls)."""
        n_random = len(self.dose_response.rows("random"))
        notes = small_sample_warnings(random_directions=n_random or None, units=self.dose_response.n_sequences)
        return notes + [f"the steered probe at {note}" for note in self.probe_caveats]

    def table(self) -> list[dict]:
        """One plain dict per condition x strength: mean entropy, KL from clean, top-1 agreement."""
        return self.dose_response.table()

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        headline, rows = self.dose_response._view()
        rows = [("model", self.model_id), ("probe", self.probe.get("path") or "in memory"), *rows]
        if self.ablation is not None:
            rows.append(("ablation", self.ablation._view()[0]))
        if self.samples:
            rows.append(("steered samples", f"{len(self.samples)} (.samples)"))
        rows += [("warning", note if len(note) <= 200 else note[:197] + "...") for note in self.warnings()[:3]]
        return headline, rows

    def summary(self) -> str:
        result = self.dose_response
        low, high = result.probe_slope_ci
        lines = [
            f"entropy slope {result.probe_slope:.4g} nats/std [{low:.4g}, {high:.4g}] "
            f"(random {result.random_slope_mean:.4g} +/- {result.random_slope_std:.4g}; z = {result.z_score:.2f}) "
            f"over {result.n_tokens} scored tokens in {result.n_sequences} sequences"
        ]
        if self.ablation is not None:
            ab = self.ablation
            lines.append(f"ablation: entropy change {ab.entropy_change[0]:.4g} nats "
                         f"(random {ab.random_change_mean:.4g} +/- {ab.random_change_std:.4g}; z = {ab.z_score:.2f})")
        lines += [f"warning: {note}" for note in self.warnings()]
        return "\n".join(lines)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write dose_response.html, ablation.html (if run) and steer.json (last) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"dose_response_html": write_html(dose_response_figure(self.dose_response),
                                                  folder / "dose_response.html")}
        if self.ablation is not None:
            paths["ablation_html"] = write_html(ablation_figure(self.ablation), folder / "ablation.html")
        paths["json"] = write_json(folder / "steer.json", self.to_dict())
        return paths


def steering_experiment(
    model,
    items: Sequence,
    probe,
    strengths: Sequence[float],
    *,
    probe_path: str | Path | None = None,
    random_directions: int = MIN_RANDOM_DIRECTIONS,
    positions: str = "response",
    hook: str | None = None,
    ablation: bool = True,
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    batched: bool = True,
    truncate: bool = False,
    samples: int = 0,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = True,
    config: dict | None = None,
) -> SteeringExperiment:
    """Steer along ``probe`` at ``strengths`` (std units), ablate it, optionally sample; see module doc.

    Every sweep forward has at most ``batch_size`` rows and ``max_batch_tokens`` tokens.
    """
    direction = from_probe(model, probe, hook=hook)
    encoded = encode_all(model, items, truncate=truncate)
    result = dose_response(
        model, encoded, direction, list(strengths), random_directions=random_directions, positions=positions,
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, batched=batched, seed=seed, n_boot=n_boot,
        progress=progress,
    )
    ablated = None
    if ablation:
        ablated = directional_ablation(
            model, encoded, direction, random_directions=random_directions, positions=positions,
            batch_size=batch_size, max_batch_tokens=max_batch_tokens, seed=seed, n_boot=n_boot, progress=progress,
        )
    rows = []
    for index, item in enumerate(list(items)[:samples]):
        for strength in sorted({min(strengths), 0.0, max(strengths)}):
            steer = Steer(hooks=direction.hook, direction=direction.direction, strength=strength, scale=direction.std)
            sample = generate(model, item, steer, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed + index)[0]
            rows.append({"input": index, "strength": strength, "seed": sample.seed, "prompt": sample.prompt,
                         "text": sample.text, "token_ids": sample.token_ids})
    caveats = probe.caveats() if hasattr(probe, "caveats") else []
    return SteeringExperiment(model_id(model), probe_artifact(probe_path), result, ablated, rows, dict(config or {}),
                              caveats)


@dataclass(repr=False)
class PatchingExperiment(NotebookView):
    """Activation patching along one probe direction, with its provenance."""

    model_id: str
    probe: dict
    patching: PatchingResult
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "command": "patch",
            "model_id": self.model_id,
            "probe": self.probe,
            "config": self.config,
            "patching": self.patching.to_dict(),
            "n_pairs": self.patching.n_pairs,
            "n_measured_tokens": self.patching.n_measured_tokens,
            "software_versions": software_versions(),
        }

    def table(self) -> list[dict]:
        """One plain dict per hook x group (see ``PatchingResult.table``)."""
        return self.patching.table()

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        headline, rows = self.patching._view()
        return headline, [("model", self.model_id), ("probe", self.probe.get("path") or "in memory"), *rows]

    def summary(self) -> str:
        result = self.patching
        lines = [f"mean entropy over the measured span: source {result.entropy_source:.4f}, "
                 f"destination {result.entropy_destination:.4f} nats ({result.n_measured_tokens} tokens, "
                 f"{result.n_pairs} pairs)"]

        def cells(row):
            return "".join(f"{'n/a':>10}" if v is None else f"{v:10.3f}" for v in row)

        for component in result.components:
            lines.append(f"fraction of the gap closed ({component}):")
            lines.append(f"  {'hook':<28}" + "".join(f"{g:>10}" for g in result.groups))
            for hook_name, row in zip(result.hooks, result.fraction[component], strict=True):
                lines.append(f"  {hook_name:<28}" + cells(row))
        if result.random_directions:
            lines.append(f"{result.random_directions} random directions (control for 'direction'): mean fraction "
                         "closed [min, max], and z of the direction against them:")
            lines.append(f"  {'hook':<28}" + "".join(f"{g:>22}" for g in result.groups))
            for h, hook_name in enumerate(result.hooks):
                parts = []
                for g in range(len(result.groups)):
                    values, zed = result.random_fraction[h][g], result.z[h][g]
                    parts.append(f"{'n/a':>22}" if values is None else
                                 f"{np.mean(values):+.3f} [{min(values):+.2f},{max(values):+.2f}]"
                                 f" z {'n/a' if zed is None else f'{zed:.1f}'}".rjust(22))
                lines.append(f"  {hook_name:<28}" + "".join(parts))
        lines += [f"warning: {note}" for note in result.warnings]
        return "\n".join(lines)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write patching.html and patch.json (last) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return {
            "html": write_html(patching_figure(self.patching), folder / "patching.html"),
            "json": write_json(folder / "patch.json", self.to_dict()),
        }


def patching_experiment(
    model,
    pairs: Sequence[tuple],
    probe,
    *,
    probe_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    groups: Sequence[str] = ("prompt", "response", "first4"),
    components: Sequence[str] = ("direction", "all"),
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    n_boot: int = 1000,
    seed: int = 0,
    random_directions: int = 0,
    progress: bool = True,
    config: dict | None = None,
) -> PatchingExperiment:
    """Patch source into destination at ``layers`` (default: all) along ``probe``; see module doc.

    ``random_directions``: seeded random unit directions patched like the probe direction, as its
    control (``interventions.patching``). Every patched forward has at most ``batch_size`` rows
    and ``max_batch_tokens`` tokens.
    """
    direction = from_probe(model, probe)
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range; this model has layers 0..{n_layers - 1}")
    result = activation_patching(
        model, pairs, hooks=resid_hooks(model, layers), groups=groups, direction=direction,
        components=components, batch_size=batch_size, max_batch_tokens=max_batch_tokens, n_boot=n_boot, seed=seed,
        random_directions=random_directions if "direction" in components else 0, progress=progress,
    )
    return PatchingExperiment(model_id(model), probe_artifact(probe_path), result, dict(config or {}))
