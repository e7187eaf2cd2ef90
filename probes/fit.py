"""Fit probes from a capture folder and save everything a reader needs: the ``fit`` step as a library call.

:func:`fit_probes` verifies the capture (cheap by default: sizes and hashes of the files it
reads), runs :func:`~surprise_probe.probes.sweep.fit_sweep`, and returns a :class:`ProbeFit`
whose ``save(folder)`` writes the sweep table (CSV), the results (JSON), the layer-sweep and
alpha-curve plots (offline HTML), the held-out predictions and the best probe direction.

>>> import tempfile
>>> from surprise_probe.core.capture.run import capture
>>> from surprise_probe.testing import TINY_CORPUS, tiny_model
>>> run = capture(tiny_model(), TINY_CORPUS * 2, progress=False)
>>> fit = fit_probes(run, "surprise", n_folds=3, n_shuffles=2, n_boot=20, nested=False, progress=False)
>>> sorted(fit.save(tempfile.mkdtemp()))
['alphas_html', 'csv', 'heldout', 'html', 'json', 'probe']
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from surprise_probe.probes.plots import alpha_curve_figure, layer_sweep_figure, source_figure
from surprise_probe.probes.results import SweepResult
from surprise_probe.probes.sweep import fit_sweep

from surprise_probe.core.capture.store import Capture, verify_capture
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView
from surprise_probe.core.utils.plots import write_html
from surprise_probe.core.utils.stats import permutation_p_text
from surprise_probe.core.utils.storage import write_atomic

__all__ = ["ProbeFit", "fit_probes"]


@dataclass(repr=False)
class ProbeFit(NotebookView):
    """A probe sweep over the hooks of one capture, plus where its data came from."""

    sweep: SweepResult
    capture_path: str | None
    capture_hash: str | None
    verified: str  # "sizes+hashes", "skipped", or "in memory"
    config: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """One plain dict per hook (``SweepResult.table``)."""
        return self.sweep.table()

    def to_dict(self) -> dict:
        """The sweep's JSON plus where the capture came from, the command config and versions."""
        payload = self.sweep.to_dict()
        payload["capture"] = {"path": self.capture_path, "content_hash": self.capture_hash,
                              "verified": self.verified}
        payload["command_config"] = self.config
        payload["software_versions"] = software_versions()
        return payload

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write sweep.csv, sweep.json, sweep.html, alphas.html, heldout.npz and probe.* into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": self.sweep.write_csv(folder / "sweep.csv"),
            "html": write_html(layer_sweep_figure(self.sweep), folder / "sweep.html"),
            "alphas_html": write_html(alpha_curve_figure(self.sweep), folder / "alphas.html"),
            "heldout": folder / "heldout.npz",
        }
        if self.sweep.by_source:
            paths["sources_html"] = write_html(source_figure(self.sweep), folder / "sources.html")
        heldout = io.BytesIO()
        np.savez_compressed(heldout, **{k.replace(":", "__"): v for k, v in self.sweep.predictions.items()})
        write_atomic(paths["heldout"], heldout.getvalue())
        paths["probe"] = self.sweep.direction().save(folder / "probe")
        payload = self.to_dict()
        payload["best_probe"] = str(folder / "probe")
        payload["best_probe_caveats"] = self.caveats()
        # Written last: its presence means the fit folder is complete.
        paths["json"] = write_json(folder / "sweep.json", payload)
        return paths

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        headline, rows = self.sweep._view()
        where = self.capture_path or "in memory"
        return headline, [*rows, ("capture", f"{where} (verified: {self.verified})")]

    def caveats(self) -> list[str]:
        """Why the exported (best) probe may not be worth steering with; empty when it passes."""
        return self.sweep.direction().caveats()

    def summary(self) -> str:
        result = self.sweep
        controls = result.controls
        best = result[result.best_hook()]
        span = result.config.get("span_rule", "")
        outside = result.config.get("n_tokens_outside_span", 0)
        lines = [f"target: {result.target} on {result.n_tokens} tokens in {result.n_sequences} sequences",
                 f"tokens: {span}" + (f" ({outside} listed tokens outside it left out)" if outside else ""),
                 result.to_markdown(), "", "baselines (held-out R^2 of each control alone):",
                 result.controls_markdown()]
        if controls.get("surprise_entropy_r") is not None:
            lines.append(f"Pearson r(input surprise, output entropy): {controls['surprise_entropy_r']}")
        n_shuffles = len(best.shuffle_r2)
        lines.append(f"best hook: {best.hook} (R^2 {best.r2}, shuffle p {permutation_p_text(best.shuffle_p, n_shuffles)})"
                     f" -> exported as the probe")
        lines += [f"warning: {note}" for note in result.warnings]
        lines += [f"warning: the exported probe at {note}" for note in self.caveats()]
        for label, scores in sorted(result.by_source.items()):
            at_best = scores.get("hooks", {}).get(best.hook)
            if at_best is not None:
                lines.append(
                    f"  {label} ({scores['n_sequences']} seq, {scores['n_tokens']} tok): R^2 {at_best['r2']}, "
                    f"calibration slope {at_best['calibration_slope']}, intercept {at_best['calibration_intercept']}"
                )
        return "\n".join(lines)


def fit_probes(
    run: Capture,
    target="surprise",
    *,
    hooks: list[str] | None = None,
    verify: bool = True,
    config: dict | None = None,
    **sweep_options,
) -> ProbeFit:
    """Verify ``run`` (unless ``verify=False``) and fit a probe sweep (``fit_sweep`` options)."""
    if run.path is not None and verify:
        verify_capture(run, hooks=hooks)
        verified = "sizes+hashes"
    else:
        verified = "in memory" if run.path is None else "skipped"
    sweep = fit_sweep(run, target, hooks=hooks, **sweep_options)
    return ProbeFit(
        sweep=sweep,
        capture_path=None if run.path is None else str(run.path),
        capture_hash=run.manifest.get("content_hash"),
        verified=verified,
        config=dict(config or {}),
    )
