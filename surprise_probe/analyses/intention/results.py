"""The results of an intention analysis: :class:`ModelIntention` per model, :class:`IntentionResult`
for the run (``save`` writes ``intention.json`` and the HTML figures, ``summary`` the headline lines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from surprise_probe.analyses.intention.plots import (
    commitment_figure,
    prefill_figure,
    readout_figure,
    topic_distribution_figure,
)
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, ci_text
from surprise_probe.core.utils.plots import write_html

__all__ = ["ModelIntention", "IntentionResult"]


@dataclass(repr=False)
class ModelIntention(NotebookView):
    """Everything measured on one model (see the module docstring)."""

    model_id: str
    prompt_format: str
    n_layers: int
    rows: list[dict]
    topic_entropy: dict
    modal_share: dict
    bucket_shares: dict
    uniform_reference: float
    commitment: list[dict]
    readout: dict
    prefill: dict
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        te, ms = self.topic_entropy, self.modal_share
        entropy = ci_text(te["value"], te.get("low"), te.get("high"))
        rows = [("model", f"{self.model_id} ({self.prompt_format} format)"),
                ("sample", f"{te['n_prompts']} prompts, {te['n_rows']} phrasings, {te['n_samples']} samples"),
                ("topic entropy at k=0", f"{entropy} nats (uniform: {self.uniform_reference:.3f})"),
                ("modal topic share", ci_text(ms["value"], ms.get("low"), ms.get("high")))]
        probe = self.readout.get("probe")
        if probe:
            best = max(probe, key=lambda row: row["accuracy"])
            rows.append((f"probe accuracy (depth {best['depth']})", ci_text(best["accuracy"], best["low"], best["high"])))
        difference = self.prefill.get("difference")
        if difference:
            rows.append(("prefill other - own", f"{ci_text(difference['mean'], difference['low'], difference['high'])} "
                                                f"nats, {self.prefill['n_pairs']} pairs"))
        return f"{self.model_id}: topic entropy {entropy} nats, {te['n_prompts']} prompts", rows


@dataclass(repr=False)
class IntentionResult(NotebookView):
    """The analysis of one or more models on one prompt set; ``save(folder)`` writes JSON + HTML."""

    config: dict
    prompts: list[dict]
    models: list[ModelIntention] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "analysis": "intention",
            "config": self.config,
            "n_prompts": len({p["group"] for p in self.prompts}),
            "n_phrasings": len(self.prompts),
            "prompts": self.prompts,
            "models": [m.to_dict() for m in self.models],
            "software_versions": software_versions(),
        }

    def save(self, folder: str | Path) -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": write_json(folder / "intention.json", self.to_dict())}
        figures = {
            "topics": topic_distribution_figure(self),
            "commitment": commitment_figure(self),
            "readout": readout_figure(self),
            "prefill": prefill_figure(self),
        }
        for name, figure in figures.items():
            paths[name] = write_html(figure, folder / f"intention_{name}.html")
        return paths

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [("sample", f"{len({p['group'] for p in self.prompts})} prompts, {len(self.prompts)} phrasings")]
        rows += [(m.model_id, m._view()[0].split(": ", 1)[-1]) for m in self.models]
        return f"{len(self.models)} model(s); " + "; ".join(m._view()[0] for m in self.models), rows

    def summary(self) -> str:
        """A few lines per model: the headline numbers with CIs and sizes."""
        lines = []
        for m in self.models:
            te, ms = m.topic_entropy, m.modal_share
            lines.append(f"{m.model_id} ({m.prompt_format} format, {te['n_prompts']} prompts, "
                         f"{te['n_rows']} phrasings, {te['n_samples']} samples; {m.seconds:.0f} s: "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in m.stage_seconds.items()) + ")")
            lines.append(f"  topic entropy at k=0: {te['value']:.3f} [{te['low']:.3f}, {te['high']:.3f}] nats "
                         f"(uniform over the lexicon, same n: {m.uniform_reference:.3f}); modal share "
                         f"{ms['value']:.2f} [{ms['low']:.2f}, {ms['high']:.2f}]; other {m.bucket_shares['other']:.2f}")
            curve = ", ".join(f"k={c['k']}: {c['value']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
                              for c in m.commitment if c.get("value") is not None)
            lines.append(f"  commitment: {curve}")
            probe = m.readout.get("probe")
            if probe:
                best = max(probe, key=lambda row: row["accuracy"])
                shuffled = m.readout["shuffled"][probe.index(best)]
                lines.append(f"  probe (best depth {best['depth']}): accuracy {best['accuracy']:.2f} "
                             f"[{best['low']:.2f}, {best['high']:.2f}] vs shuffled {shuffled['accuracy']:.2f}, "
                             f"majority {best['majority']:.2f} ({m.readout['n_rows']} phrasings)")
            else:
                lines.append(f"  probe: not fitted ({m.readout.get('skipped')})")
            p = m.prefill
            if p.get("difference"):
                d = p["difference"]
                lines.append(f"  prefill: other - own = {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] nats "
                             f"({p['n_pairs']} pairs, other higher in {p['n_other_higher']})")
            else:
                lines.append(f"  prefill: not measured ({p.get('skipped')})")
        return "\n".join(lines)
