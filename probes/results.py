"""Results of a layer sweep: one row per hook, the controls, tables, JSON and probe directions."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Float
from surprise_probe.probes.direction import ProbeDirection
from surprise_probe.probes.scoring import Estimate

from surprise_probe.core.forward.hooks import EMBEDDING_HOOK, hook_depth, hook_layer, layer_label
from surprise_probe.core.utils.jsonio import to_json, write_text
from surprise_probe.core.utils.notebook import NotebookView, TableRows, estimate_text, number_text
from surprise_probe.core.utils.stats import permutation_p_text

__all__ = ["EMBEDDING_HOOK", "HookResult", "SweepResult", "hook_depth", "hook_layer", "layer_label"]

def _p_cell(p: float, n_shuffles: int) -> str:
    """A table cell for a permutation p: ``<=0.048`` at its floor (no shuffle reached the real R²)."""
    if n_shuffles and p <= (1.0 / (1 + n_shuffles)) * (1 + 1e-9):
        return f"<={p:.3f}"
    return f"{p:.3f}"


def _plain(value):
    """Estimates (nested in dicts) as dicts, for JSON."""
    if isinstance(value, Estimate):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(repr=False)
class HookResult(NotebookView):
    """One row of the sweep: the held-out scores of the probe at one hook, and its controls.

    ``r2`` is the pooled held-out R² (see :class:`SweepResult`), ``fold_r2`` each fold's own;
    ``residual_r2`` the probe on the target minus its token-type mean, ``beyond_r2[name]`` on the
    target minus each other control; ``row()`` / ``to_dict()`` plain dicts.
    """

    hook: str
    depth: float
    layer: int | None
    alpha: float  # chosen by k-fold CV on all tokens; the alpha of the saved direction
    fold_alphas: list[float]  # chosen per outer fold (nested CV); the held-out scores use these
    r2: Estimate
    pearson_r: Estimate
    residual_r2: Estimate  # predicting target minus token-identity mean
    shuffle_r2: list[float]  # pooled held-out R^2 of probes fitted to shuffled targets
    shuffle_p: float  # (1 + #shuffles with R^2 >= real) / (1 + #shuffles)
    selectivity: float  # r2 minus the token-identity mean's R^2
    cv_r2_by_alpha: list[float]  # pooled held-out R^2 at each alpha (outer folds, no nesting)
    fold_r2: list[float]  # held-out R^2 of each outer fold
    stats_r2: float  # the same pooled R^2 computed from the statistics (a consistency check)
    coef: Float[np.ndarray, " d"] = field(repr=False)  # all-token fit at `alpha`, activation space
    intercept: float = field(repr=False, default=0.0)
    projection_mean: float = field(repr=False, default=0.0)
    projection_std: float = field(repr=False, default=0.0)
    # probe R^2 on the target minus each other control (position, bigram, covariates)
    beyond_r2: dict[str, Estimate] = field(default_factory=dict)

    def row(self) -> dict:
        """Flat dict for the CSV table."""
        return {
            "hook": self.hook,
            "depth": self.depth,
            "layer": self.layer,
            "alpha": self.alpha,
            "r2": self.r2.value,
            "r2_low": self.r2.low,
            "r2_high": self.r2.high,
            "pearson_r": self.pearson_r.value,
            "pearson_r_low": self.pearson_r.low,
            "pearson_r_high": self.pearson_r.high,
            "residual_r2": self.residual_r2.value,
            "residual_r2_low": self.residual_r2.low,
            "residual_r2_high": self.residual_r2.high,
            "shuffle_r2_mean": float(np.mean(self.shuffle_r2)) if self.shuffle_r2 else float("nan"),
            "shuffle_r2_max": float(np.max(self.shuffle_r2)) if self.shuffle_r2 else float("nan"),
            "shuffle_p": self.shuffle_p,
            "selectivity": self.selectivity,
            **{
                f"beyond_{name}{suffix}": getattr(estimate, part)
                for name, estimate in self.beyond_r2.items()
                for suffix, part in (("_r2", "value"), ("_r2_low", "low"), ("_r2_high", "high"))
            },
        }

    def to_dict(self) -> dict:
        out = self.row()
        for name in ("r2", "pearson_r", "residual_r2"):
            out[name] = getattr(self, name).to_dict()
            for suffix in ("_low", "_high"):
                out.pop(name + suffix, None)
        for name in self.beyond_r2:
            for suffix in ("_r2", "_r2_low", "_r2_high"):
                out.pop(f"beyond_{name}{suffix}", None)
        out["beyond_r2"] = {name: e.to_dict() for name, e in self.beyond_r2.items()}
        out.update(
            fold_alphas=self.fold_alphas,
            shuffle_r2=self.shuffle_r2,
            cv_r2_by_alpha=self.cv_r2_by_alpha,
            fold_r2=self.fold_r2,
            stats_r2=self.stats_r2,
            projection_mean=self.projection_mean,
            projection_std=self.projection_std,
        )
        return out

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        shuffle = self.row()["shuffle_r2_mean"]
        rows = [("hook", f"{self.hook} (layer {layer_label(self.hook)}, depth {self.depth:g})"),
                ("held-out R^2", estimate_text(self.r2)),
                ("Pearson r", estimate_text(self.pearson_r)),
                ("R^2 beyond token-type mean", estimate_text(self.residual_r2)),
                *((f"R^2 beyond {name}", estimate_text(e)) for name, e in self.beyond_r2.items()),
                ("shuffled labels", f"mean R^2 {number_text(shuffle)}, p "
                                    f"{permutation_p_text(self.shuffle_p, len(self.shuffle_r2))}"),
                ("ridge alpha", f"{self.alpha:.3g} ({len(self.fold_r2)} folds)")]
        return f"{self.hook}: R^2 {estimate_text(self.r2)}, r {number_text(self.pearson_r.value)}", rows


@dataclass(repr=False)
class SweepResult(NotebookView):
    """Every hook's probe scores, the controls, and what is needed to save a probe direction.

    Reading it: ``result[hook]`` is that hook's :class:`HookResult`; ``result[hook].r2`` its
    held-out R² with a sequence-bootstrap CI; ``result.best_hook()`` the best non-embedding hook;
    ``result.controls`` the run-wide baselines (token-type mean, position, bigram, embedding
    probe); ``result.table()`` one plain dict per hook (the CSV rows), ``result.to_dict()`` the
    JSON, ``result.to_markdown()`` the printed table, ``result.direction(hook)`` the probe
    direction.

    **Pooled vs fold-averaged R².** ``r2`` (the number reported everywhere) is *pooled*: every
    token's held-out prediction (each from the fold that did not see its sequence) goes into one
    ``1 - SSE / SST`` around the mean of all tokens. ``fold_r2`` lists each fold's own R², around
    that fold's mean; their average is usually a little lower (each fold's SST is smaller) and
    noisier. Both are held-out; pooled is the one with a CI.

    >>> import surprise_probe as sp
    >>> from surprise_probe.probes import fit_sweep
    >>> from surprise_probe.testing import TINY_CORPUS, tiny_model
    >>> run = sp.capture(tiny_model(), TINY_CORPUS * 2, progress=False)
    >>> result = fit_sweep(run, n_folds=3, n_shuffles=0, n_boot=50, progress=False)
    >>> [row["hook"] for row in result.table()]
    ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    >>> best = result[result.best_hook()]
    >>> len(best.fold_r2), best.r2.low <= best.r2.value <= best.r2.high
    (3, True)
    >>> sorted(result.to_dict())[:4]
    ['best_hook', 'by_source', 'config', 'controls']
    """

    model_id: str
    d_model: int
    target: str
    config: dict
    hooks: list[HookResult]
    controls: dict  # token_mean_r2, token_mean_r, surprise_entropy_r (Estimates), embedding_hook
    n_tokens: int
    n_sequences: int
    data_hash: str
    predictions: dict = field(repr=False, default_factory=dict)  # held-out predictions per token
    by_source: dict = field(default_factory=dict)  # per source label: sizes, R^2, calibration
    warnings: list[str] = field(default_factory=list)  # controls missing, samples too small
    model_fingerprint: dict = field(default_factory=dict)  # surprise_probe.core.models.basis, from the capture

    def __getitem__(self, hook: str) -> HookResult:
        for result in self.hooks:
            if result.hook == hook:
                return result
        raise KeyError(f"hook {hook!r} is not in this sweep; hooks: {[r.hook for r in self.hooks]}")

    def best_hook(self) -> str:
        """The hook with the highest held-out R^2 (the embedding only if it is the only hook)."""
        candidates = [r for r in self.hooks if r.hook != EMBEDDING_HOOK] or self.hooks
        return max(candidates, key=lambda r: r.r2.value).hook

    def table(self) -> list[dict]:
        control = self.controls
        rows = []
        for result in self.hooks:
            row = result.row()
            row["token_mean_r2"] = control["token_mean_r2"].value
            for name in ("position", "bigram"):
                if control.get(f"{name}_r2") is not None:
                    row[f"{name}_r2"] = control[f"{name}_r2"].value
            embedding = control.get("embedding_r2")
            row["embedding_r2"] = embedding.value if embedding is not None else float("nan")
            correlation = control.get("surprise_entropy_r")
            row["surprise_entropy_r"] = (
                correlation.value if correlation is not None else float("nan")
            )
            row["n_tokens"] = self.n_tokens
            row["n_sequences"] = self.n_sequences
            rows.append(row)
        return TableRows(rows)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        if not self.hooks:
            return f"target={self.target!r}, no hooks", [("target", self.target)]
        best = self[self.best_hook()]
        folds = self.config.get("n_folds")
        rows = [("model", self.model_id), ("target", self.target),
                ("sample", f"{self.n_sequences} sequences, {self.n_tokens} tokens"
                           + (f"; {folds}-fold CV grouped by sequence" if folds else "")),
                ("hooks", str(len(self.hooks))),
                ("best hook", best.hook),
                ("held-out R^2 at best", estimate_text(best.r2)),
                ("R^2 beyond token-type mean", estimate_text(best.residual_r2)),
                ("shuffled labels p", permutation_p_text(best.shuffle_p, len(best.shuffle_r2)))]
        labels = {"token_mean_r2": "token-type mean", "position_r2": "position", "bigram_r2": "bigram",
                  "embedding_r2": "embedding probe"}
        rows += [(f"baseline: {label} R^2", estimate_text(self.controls[key]))
                 for key, label in labels.items() if self.controls.get(key) is not None]
        rows += [("warning", note if len(note) <= 200 else note[:197] + "...") for note in self.warnings[:3]]
        if len(self.warnings) > 3:
            rows.append(("warnings", f"{len(self.warnings) - 3} more in .warnings"))
        return (f"target={self.target!r}, {len(self.hooks)} hooks, best {best.hook} R^2 {estimate_text(best.r2)}, "
                f"{self.n_sequences} sequences, {self.n_tokens} tokens"), rows

    def to_markdown(self) -> str:
        beyond = list(self.hooks[0].beyond_r2) if self.hooks else []
        head = (
            "| hook | layer | alpha | R^2 [95% CI] | r | beyond token mean | "
            + "".join(f"beyond {name} | " for name in beyond)
            + "shuffle R^2 (p) |"
        )
        lines = [head, "|---|---:|---:|---|---:|---:|" + "---:|" * len(beyond) + "---|"]
        for r in self.hooks:
            row = r.row()
            lines.append(
                f"| {r.hook} | {layer_label(r.hook)} | {r.alpha:.3g} | {r.r2} | {r.pearson_r.value:.3f} | "
                f"{r.residual_r2.value:.3f} | "
                + "".join(f"{r.beyond_r2[name].value:.3f} | " for name in beyond)
                + f"{row['shuffle_r2_mean']:.3f} ({_p_cell(r.shuffle_p, len(r.shuffle_r2))}) |"
            )
        return "\n".join(lines)

    def controls_markdown(self) -> str:
        """The run-wide baselines (held-out R² of each control alone), one line each."""
        lines = []
        labels = {
            "token_mean_r2": "token-type mean",
            "position_r2": "position (sequence and scored span)",
            "bigram_r2": "bigram (previous + current token)",
            "embedding_r2": "embedding-layer probe",
        }
        for key, label in labels.items():
            if self.controls.get(key) is not None:
                lines.append(f"{label} R^2: {self.controls[key]}")
        for name, estimate in self.controls.get("covariate_r2", {}).items():
            lines.append(f"covariate {name} R^2: {estimate}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        controls = _plain(self.controls)
        return {
            "model_id": self.model_id,
            "d_model": self.d_model,
            "target": self.target,
            "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences,
            "data_hash": self.data_hash,
            "config": self.config,
            "best_hook": self.best_hook(),
            "controls": controls,
            "hooks": [r.to_dict() for r in self.hooks],
            "by_source": _plain(self.by_source),
            "warnings": self.warnings,
        }

    def write_csv(self, path: str | Path) -> Path:
        rows = self.table()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return write_text(path, text.getvalue())

    def write_json(self, path: str | Path) -> Path:
        return write_text(path, to_json(self.to_dict()))

    def direction(self, hook: str | None = None):
        """The :class:`probes.ProbeDirection` of the all-token probe at ``hook`` (default: best)."""

        result = self[hook or self.best_hook()]
        norm = float(np.linalg.norm(result.coef))
        if norm == 0:
            raise ValueError(f"the probe at {result.hook!r} has zero weights; it has no direction")
        metrics = {
            "r2": result.r2.to_dict(),
            "pearson_r": result.pearson_r.to_dict(),
            "residual_r2": result.residual_r2.to_dict(),
            "beyond_r2": {name: e.to_dict() for name, e in result.beyond_r2.items()},
            "shuffle_p": result.shuffle_p,
            "shuffle_r2_mean": result.row()["shuffle_r2_mean"],
            "token_mean_r2": self.controls["token_mean_r2"].to_dict(),
            "selectivity": result.selectivity,
            "alpha": result.alpha,
            "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences,
            "n_folds": self.config["n_folds"],
        }
        return ProbeDirection(
            direction=result.coef / norm,
            mean=result.projection_mean,
            std=result.projection_std,
            hook=result.hook,
            layer=result.layer,
            model_id=self.model_id,
            d_model=int(len(result.coef)),
            target=self.target,
            metrics=metrics,
            data_hash=hashlib.sha256(f"{self.data_hash}|{result.hook}".encode()).hexdigest(),
            coef_norm=norm,
            intercept=result.intercept,
            model=self.model_fingerprint,
        )
