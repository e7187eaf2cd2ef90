"""The gap analysis's result: its numbers, a plain-text report, and ``save`` (``gap.json``, ``gap.html``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.analyses.policy.reading import Reading
from surprise_probe.analyses.policy.writers import WriterResponse
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.plots import write_report

__all__ = ["GapResult"]


@dataclass
class GapResult:
    """Everything the gap analysis measured, with its configuration."""

    config: dict
    models: list[dict]
    prompts: list[dict]
    responses: dict[str, list[WriterResponse]]
    readings: list[Reading]
    summary: dict
    elapsed_seconds: float = 0.0
    versions: dict = field(default_factory=software_versions)

    def comparison(self, reader: str, fmt: str, source: str) -> dict:
        for row in self.summary["comparisons"]:
            if (row["reader"], row["format"], row["source"]) == (reader, fmt, source):
                return row
        raise KeyError(f"no comparison for reader {reader!r}, format {fmt!r}, source {source!r}")

    def cell(self, reader: str, fmt: str, source: str) -> dict:
        for row in self.summary["cells"]:
            if (row["reader"], row["format"], row["source"]) == (reader, fmt, source):
                return row
        raise KeyError(f"no cell for reader {reader!r}, format {fmt!r}, source {source!r}")

    def report(self) -> str:
        """A plain-text summary: per reader and format, the on-policy entropy and each off/on ratio."""
        k = self.config["k"]
        lines = []
        for m in self.models:
            lines.append(f"reader {m['name']} ({'post-trained' if m['post_trained'] else 'base' if m['post_trained'] is False else 'kind unknown'}, "
                         f"samples in {m['sampling_format']} format; {m['n_empty_responses']} empty responses, "
                         f"mean {m['mean_response_tokens']:.1f} tokens)")
            for fmt in m["formats_read"]:
                try:
                    own = self.cell(m["name"], fmt, "own")["mean_entropy"]
                except KeyError:
                    continue
                lines.append(f"  {fmt:<9} own: {own['mean']:.3f} nats [{own['low']:.3f}, {own['high']:.3f}] "
                             f"n={own['n_prompts']}")
                for row in self.summary["comparisons"]:
                    if row["reader"] != m["name"] or row["format"] != fmt or not row["span"].get("n_prompts"):
                        continue
                    r, f, sign = row["span"]["ratio_off_on"], row[f"first_{k}"], row["span"]["sign_count"]
                    a = row["auroc_entropy"]
                    first = f.get("ratio_off_on", {}).get("value", float("nan"))
                    probe = row.get("auroc_probe")
                    lines.append(
                        f"    {row['source']:<28} off/on {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
                        f"  first {k}: {first:.3f}  off higher {sign['off_higher']}/{row['span']['n_prompts']}"
                        f"  AUROC {a['auroc']:.2f} [{a['low']:.2f}, {a['high']:.2f}]"
                        + (f"  probe AUROC {probe['auroc']:.2f} [{probe['low']:.2f}, {probe['high']:.2f}]"
                           if probe else "")
                    )
        if self.config.get("probe") and not any(m.get("probe") for m in self.models):
            lines.append(f"probe {self.config['probe']}: fitted on none of these models, so no probe AUROC")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "analysis": "policy_gap",
            "config": self.config,
            "models": self.models,
            "n_prompts": len(self.prompts),
            "n_prompts_with_human_answer": sum(p["has_answer"] for p in self.prompts),
            "prompts": self.prompts,
            "summary": self.summary,
            "per_response": [
                {"reader": r.reader, "format": r.format, "source": r.source, "prompt_index": r.prompt_index,
                 "sample_index": r.sample_index, "exact_ids": r.exact_ids, "n_tokens": len(r.entropy),
                 "mean_entropy": float(r.entropy.mean()) if len(r.entropy) else None,
                 "probe_readout": r.probe_readout, "truncated": r.truncated}
                for r in self.readings
            ],
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "software_versions": self.versions,
        }

    def save(self, folder: str | Path) -> dict[str, Path]:
        """``gap.json`` (config, results, sizes, versions) and ``gap.html`` (every figure, one page)."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        figures = policy_plots.all_figures(self)
        sections = [(policy_plots.CAPTIONS[name][0], f"<p>{policy_plots.CAPTIONS[name][1]}</p>") for name in figures]
        sections = [part for (heading, caption), fig in zip(sections, figures.values(), strict=True)
                    for part in ((heading, caption), ("", fig))]
        models = ", ".join(f"{m['name']} ({m['sampling_format']} sampling)" for m in self.models)
        intro = (f"<p>Readers and writers: {models}. {len(self.prompts)} prompts, "
                 f"{self.config['n_samples']} sample(s) each, up to {self.config['max_new_tokens']} tokens at "
                 f"temperature {self.config['temperature']}. Protocol and caveats: docs/policy-gap.md.</p>")
        return {
            "json": write_json(folder / "gap.json", self.to_dict()),
            "html": write_report(sections, folder / "gap.html", "On/off-policy entropy gap", intro),
        }
