"""A first look at a capture: mean surprise and entropy with CIs, and residual norms per hook.

A first look only; the probes (``surprise-probe fit``) are the real measurement.

>>> from surprise_probe.core.capture.run import capture
>>> from surprise_probe.testing import tiny_model
>>> run = capture(tiny_model(), ["One text here.", "Another text."], progress=False)
>>> summary = summarize_capture(run, n_boot=50)
>>> summary.n_sequences, [row["hook"] for row in summary.layers][-1]
(2, 'blocks.1.hook_resid_post')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from surprise_probe.core.capture.store import Capture
from surprise_probe.core.forward.hooks import hook_depth
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, TextTable, estimate_text, number_text
from surprise_probe.core.utils.stats import bootstrap_mean

__all__ = ["CaptureSummary", "summarize_capture", "layer_summary"]


def layer_summary(run: Capture) -> list[dict]:
    """Per hook: mean residual norm over scored tokens, and its correlation with surprise/entropy."""
    surprise = run.column("input_surprise", scored_only=True)
    entropy = run.column("output_entropy", scored_only=True)
    finite = np.isfinite(surprise)
    rows = []
    for hook in run.hooks:
        norms = np.linalg.norm(run.activations(hook, scored_only=True).astype(np.float64), axis=1)
        rows.append(
            {
                "hook": hook,
                "depth": hook_depth(hook),
                "mean_norm": float(norms.mean()),
                "corr_norm_surprise": float(np.corrcoef(norms[finite], surprise[finite])[0, 1])
                if finite.sum() > 1 else float("nan"),
                "corr_norm_entropy": float(np.corrcoef(norms, entropy)[0, 1]) if len(norms) > 1 else float("nan"),
            }
        )
    return rows


@dataclass(repr=False)
class CaptureSummary(NotebookView):
    """Means over the scored tokens (sequence-bootstrap CIs) and the per-hook first look."""

    model_id: str
    n_sequences: int
    n_tokens: int
    n_scored_tokens: int
    input_surprise: dict
    output_entropy: dict
    layers: list[dict]
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "software_versions": software_versions()}

    def table(self) -> str:
        lines = [f"{'hook':<28} {'depth':>5} {'|resid|':>9} {'r(|resid|, s)':>14} {'r(|resid|, H)':>14}"]
        for row in self.layers:
            lines.append(
                f"{row['hook']:<28} {row['depth']:>5} {row['mean_norm']:>9.2f} "
                f"{row['corr_norm_surprise']:>14.3f} {row['corr_norm_entropy']:>14.3f}"
            )
        cells = [[row["hook"], row["depth"], f"{row['mean_norm']:.2f}", number_text(row["corr_norm_surprise"]),
                  number_text(row["corr_norm_entropy"])] for row in self.layers]
        return TextTable("\n".join(lines), ["hook", "depth", "|resid|", "r(|resid|, s)", "r(|resid|, H)"], cells)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        n_units = self.input_surprise.get("n_units", self.n_sequences)
        surprise, entropy = estimate_text(self.input_surprise), estimate_text(self.output_entropy)
        rows = [("model", self.model_id),
                ("sample", f"{self.n_sequences} sequences, {self.n_tokens} tokens ({self.n_scored_tokens} scored)"),
                ("mean input surprise (scored)", f"{surprise} nats"),
                ("mean output entropy (scored)", f"{entropy} nats"),
                ("CIs", f"{self.input_surprise.get('level', 0.95):.0%} bootstrap over {n_units} sequences"),
                ("hooks", f"{len(self.layers)} (.table(): residual norm and its correlations per hook)")]
        return (f"{self.n_sequences} sequences, {self.n_scored_tokens} scored tokens, surprise {surprise}, "
                f"entropy {entropy} nats"), rows

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``capture_summary.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return {"json": write_json(folder / "capture_summary.json", self.to_dict())}


def summarize_capture(run: Capture, *, n_boot: int = 1000, seed: int = 0, config: dict | None = None) -> CaptureSummary:
    """Mean input surprise / output entropy over the scored span, and :func:`layer_summary`."""
    sequence_ids = run.column("sequence_ids", True)
    surprise = bootstrap_mean(run.column("input_surprise", True), sequence_ids, n_boot=n_boot, seed=seed)
    entropy = bootstrap_mean(run.column("output_entropy", True), sequence_ids, n_boot=n_boot, seed=seed)
    return CaptureSummary(
        model_id=run.model_id,
        n_sequences=run.n_sequences,
        n_tokens=run.n_tokens,
        n_scored_tokens=int(run.manifest.get("n_scored_tokens", len(sequence_ids))),
        input_surprise=surprise.to_dict(),
        output_entropy=entropy.to_dict(),
        layers=layer_summary(run),
        config=dict(config or {}),
    )
