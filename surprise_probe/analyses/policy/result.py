"""The gap analysis's result: its numbers, a plain-text report, and ``save`` (``gap.json``, ``gap.html``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from surprise_probe.analyses.policy import plots as policy_plots
from surprise_probe.analyses.policy.reading import Reading
from surprise_probe.analyses.policy.statistics import DETECTORS, response_statistics
from surprise_probe.analyses.policy.writers import WriterResponse
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, ci_text
from surprise_probe.core.utils.plots import write_report

__all__ = ["GapResult", "DETECTOR_LABELS"]

# Short names of the detectors (statistics.DETECTORS) in text and figures.
DETECTOR_LABELS = {"entropy": "entropy", "log_likelihood": "log-likelihood", "log_rank": "log-rank",
                   "fast_detectgpt": "Fast-DetectGPT", "binoculars": "Binoculars"}


def _interval(row: dict, digits: int) -> str:
    """``[low, high]``, or why there is no interval (too few prompts or responses), beside the number."""
    low, high = row.get("low"), row.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"[{row.get('note') or 'no CI'}]"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _auroc_text(row: dict | None) -> str:
    """``0.91 [0.80, 1.00]``, or why there is none (``n/a: <reason>``)."""
    if not row:
        return "n/a"
    if row.get("available") is False:
        return "n/a"
    low, high = row.get("low"), row.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{row['auroc']:.2f} (no CI)"
    return f"{row['auroc']:.2f} [{low:.2f}, {high:.2f}]"


@dataclass(repr=False)
class GapResult(NotebookView):
    """Everything the gap analysis measured, with its configuration.

    Per comparison (``summary["comparisons"]``, :meth:`comparison`) one AUROC per detector of
    model-written text, ``auroc_<name>`` for each name in ``summary["detectors"]`` (entropy,
    log_likelihood, log_rank, fast_detectgpt, binoculars; :meth:`detector_aurocs`), each oriented
    so that higher means own (on-policy); ``auroc_binoculars`` is ``{"available": False, "reason":
    ...}`` where no second model shares the reader's tokenizer. ``summary["temperature_curve"]``
    (:attr:`temperature_curve`): the off/on ratio per reader, source and sampling temperature,
    empty unless temperatures were asked for.
    """

    config: dict
    models: list[dict]
    prompts: list[dict]
    responses: dict[str, list[WriterResponse]]
    readings: list[Reading]
    summary: dict
    elapsed_seconds: float = 0.0
    versions: dict = field(default_factory=software_versions)
    temperature_readings: dict[float, list[Reading]] = field(default_factory=dict)
    temperature_responses: dict[float, dict[str, list[WriterResponse]]] = field(default_factory=dict)

    @property
    def temperature_curve(self) -> list[dict]:
        """``[{"reader", "format", "temperature", "source", "ratio", "ci": [low, high], "n", ...}]``."""
        return self.summary.get("temperature_curve", [])

    def detector_aurocs(self, reader: str, fmt: str, source: str) -> dict[str, dict]:
        """Each detector's AUROC of own vs ``source`` (``{name: {"auroc", "low", "high", ...}}``, or
        ``{"available": False, "reason": ...}``), keyed by the names of ``summary["detectors"]``."""
        row = self.comparison(reader, fmt, source)
        return {name: row[spec["key"]] for name, spec in self.summary["detectors"].items() if spec["key"] in row}

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
                lines.append(f"  {fmt:<9} own: {own['mean']:.3f} nats {_interval(own, 3)} n={own['n_prompts']}")
                for row in self.summary["comparisons"]:
                    if row["reader"] != m["name"] or row["format"] != fmt or not row["span"].get("n_prompts"):
                        continue
                    r, f, sign = row["span"]["ratio_off_on"], row[f"first_{k}"], row["span"]["sign_count"]
                    a = row["auroc_entropy"]
                    first = f.get("ratio_off_on", {}).get("value", float("nan"))
                    probe = row.get("auroc_probe")
                    lines.append(
                        f"    {row['source']:<28} off/on {r['value']:.3f} {_interval(r, 3)}"
                        f"  first {k}: {first:.3f}  off higher {sign['off_higher']}/{row['span']['n_prompts']}"
                        f"  AUROC {a['auroc']:.2f} {_interval(a, 2)}"
                        + (f"  probe AUROC {probe['auroc']:.2f} {_interval(probe, 2)}" if probe else "")
                    )
                    lines.append("      detectors AUROC: " + "  ".join(
                        f"{DETECTOR_LABELS[name]} {_auroc_text(row.get(f'auroc_{name}'))}"
                        for name in DETECTORS if name != "entropy"))
        binoculars = self.summary.get("detectors", {}).get("binoculars", {})
        for reader, why in binoculars.get("readers", {}).items():
            lines.append(f"Binoculars for {reader}: " + (f"observer {why['observer']}" if why["available"]
                                                          else f"not available ({why['reason']})"))
        if self.summary.get("detectors"):
            lines.append("detector AUROCs: own (on-policy) vs each source, every score oriented so higher = own; "
                         "DeLong 95% CIs over responses")
        if self.temperature_curve:
            lines.append("temperature curve (own responses sampled again at each temperature; off/on mean entropy):")
            for row in self.temperature_curve:
                lo, hi = row["ci"]
                lines.append(f"  {row['reader']} ({row['format']}) T={row['temperature']:<5g} {row['source']:<28} "
                             f"off/on {row['ratio']:.3f} {_interval({'low': lo, 'high': hi, 'note': row.get('note')}, 3)}"
                             f" n={row['n']}")
        if self.config.get("probe") and not any(m.get("probe") for m in self.models):
            lines.append(f"probe {self.config['probe']}: fitted on none of these models, so no probe AUROC")
        lines += [f"warning: {note}" for note in self.summary.get("warnings", [])]
        return "\n".join(lines)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        readers = ", ".join(m["name"] for m in self.models)
        rows = [("readers", readers),
                ("sample", f"{len(self.prompts)} prompts x {self.config['n_samples']} sample(s), "
                           f"up to {self.config['max_new_tokens']} tokens; {len(self.readings)} reads")]
        headline = ""
        for cell in [c for c in self.summary.get("cells", []) if c["source"] == "own"][:6]:
            own = cell["mean_entropy"]
            rows.append((f"{cell['reader']} reads own ({cell['format']})",
                         f"{ci_text(own['mean'], own['low'], own['high'])} nats, {own['n_prompts']} prompts"))
        comparisons = [row for row in self.summary.get("comparisons", []) if row["span"].get("n_prompts")]
        for row in comparisons[:8]:
            ratio, span = row["span"]["ratio_off_on"], row["span"]
            text = f"{ci_text(ratio['value'], ratio.get('low'), ratio.get('high'))}, {span['n_prompts']} prompts"
            rows.append((f"off/on {row['reader']} ({row['format']}) {row['source']}", text))
            headline = headline or f"off/on entropy {row['source']} ({row['format']}) {text}"
        if len(comparisons) > 8:
            rows.append(("comparisons", f"{len(comparisons) - 8} more (.report())"))
        for row in comparisons[:4]:
            rows.append((f"detector AUROCs {row['reader']} ({row['format']}) {row['source']}", "; ".join(
                f"{DETECTOR_LABELS[name]} {_auroc_text(row.get(f'auroc_{name}'))}" for name in DETECTORS)))
        binoculars = self.summary.get("detectors", {}).get("binoculars", {})
        if binoculars and not binoculars.get("available"):
            reasons = {b["reason"] for b in binoculars.get("readers", {}).values() if b.get("reason")}
            rows.append(("Binoculars", "not available: " + "; ".join(sorted(reasons))))
        for row in self.temperature_curve[:8]:
            rows.append((f"T={row['temperature']:g} off/on {row['reader']} ({row['format']}) {row['source']}",
                         f"{ci_text(row['ratio'], *row['ci'])}, {row['n']} prompts"))
        if len(self.temperature_curve) > 8:
            rows.append(("temperature curve", f"{len(self.temperature_curve) - 8} more rows (.report())"))
        rows += [("warning", note if len(note) <= 200 else note[:197] + "...")
                 for note in self.summary.get("warnings", [])[:3]]
        return f"readers {readers}, {len(self.prompts)} prompts" + (f"; {headline}" if headline else ""), rows

    def to_dict(self) -> dict:
        return {
            "analysis": "policy_gap",
            "warnings": self.summary.get("warnings", []),
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
                 "probe_readout": r.probe_readout, "truncated": r.truncated,
                 **_detector_statistics(r), "observer": r.observer}
                for r in self.readings
            ],
            "temperature_per_response": [
                {"temperature": t, "reader": r.reader, "format": r.format, "source": r.source,
                 "prompt_index": r.prompt_index, "sample_index": r.sample_index, "n_tokens": len(r.entropy),
                 "mean_entropy": float(r.entropy.mean()) if len(r.entropy) else None}
                for t, rs in sorted(self.temperature_readings.items()) for r in rs
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
                 f"temperature {self.config['temperature']}"
                 + (f" (temperature curve: {', '.join(f'{t:g}' for t in self.config['temperatures'])})"
                    if self.config.get("temperatures") else "")
                 + ". Protocol and caveats: docs/policy-gap.md.</p>")
        return {
            "json": write_json(folder / "gap.json", self.to_dict()),
            "html": write_report(sections, folder / "gap.html", "On/off-policy entropy gap", intro),
        }


def _detector_statistics(r: Reading) -> dict:
    """The per-response detector statistics other than the mean entropy (None where undefined)."""
    stats = response_statistics(r)
    return {key: (value if math.isfinite(value) else None) for key, value in stats.items() if key != "mean_entropy"}
