"""The study's loop: each stage into its folder, resumed when its settings match, failures recorded."""


from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surprise_probe.app.study.settings import DEFAULT_SETTINGS
from surprise_probe.app.study.stages import Stage, StudyContext, default_stages, items_hash
from surprise_probe.core.models.devices import release_memory
from surprise_probe.core.models.loading import (
    model_id,
)
from surprise_probe.core.utils.jsonio import (
    finite_or_none,
    read_json,
    software_versions,
    write_json,
)
from surprise_probe.core.utils.notebook import NotebookView
from surprise_probe.core.utils.outputs import claim_output, config_record_path, first_difference
from surprise_probe.core.utils.threads import refresh_threads

# --- running ----------------------------------------------------------------------------------------

@dataclass(repr=False)
class StudyResult(NotebookView):
    """Per stage: status (``done``, ``resumed``, ``failed``, ``skipped``), settings, seconds, error."""

    out: Path
    settings: dict
    stages: dict
    total_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s["status"] in ("done", "resumed") for s in self.stages.values())

    def to_dict(self) -> dict:
        return {"command": "study", "settings": self.settings, "stages": self.stages,
                "total_seconds": round(self.total_seconds, 1), "software_versions": software_versions()}

    def save(self, folder: str | Path | None = None) -> dict[str, Path]:
        return {"json": write_json(Path(folder or self.out) / "study.json", self.to_dict())}

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        counts: dict[str, int] = {}
        for stage in self.stages.values():
            counts[stage["status"]] = counts.get(stage["status"], 0) + 1
        report = Path(self.out) / "report.html"
        rows = [("folder", str(self.out)), ("report", str(report) if report.exists() else "not written")]
        for name, stage in self.stages.items():
            text = stage["status"] + (f", {stage['seconds']:.1f} s" if "seconds" in stage else "")
            error = stage.get("error")
            rows.append((name, text + (f": {error[:150]}" if error else "")))
        tally = ", ".join(f"{n} {status}" for status, n in counts.items())
        return f"{len(self.stages)} stages ({tally}), {self.total_seconds:.0f} s, {self.out}", rows


def check_stages(out: str | Path, settings: dict, items: Sequence, stages: Sequence[Stage] | None = None) -> None:
    """Refuse (``FileExistsError``) a rerun whose settings differ from a finished stage's, before any model loads."""
    out, inputs = Path(out), items_hash(items)
    settings = {**DEFAULT_SETTINGS, **settings}
    for stage in stages or default_stages():
        folder = stage.path(out)
        if folder is None:
            continue
        record = config_record_path(folder, False)
        if not record.exists():
            continue
        try:
            recorded = read_json(record).get("config", {})
        except ValueError:
            continue
        difference = first_difference(recorded, finite_or_none(stage.config(settings, inputs)))
        if difference:
            raise FileExistsError(
                f"refusing to rerun stage {stage.name!r} in {folder}: it was run with {difference.replace(chr(39), '')}; "
                "use the same settings to resume, another --out, or --overwrite to recompute the stages that differ"
            )


def run_study(
    model,
    items: Sequence,
    out: str | Path,
    *,
    settings: dict,
    stages: Sequence[Stage] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> StudyResult:
    """Run ``stages`` (default :func:`default_stages`) on one loaded model; see the module doc.

    ``settings``: ``model`` (its name as given) plus the keys of ``DEFAULT_SETTINGS`` (missing keys
    take those defaults) and any keys added stages read.
    """
    out = Path(out)
    settings = {**DEFAULT_SETTINGS, **settings}
    settings.setdefault("model", model_id(model))
    items = list(items)
    if not items:
        raise ValueError("the study got no inputs")
    stages = list(stages or default_stages())
    inputs = items_hash(items)
    ctx = StudyContext(model, items, out, settings, str(settings["model"]), progress=progress, stages=stages)
    status = ctx.status
    with claim_output(out, "study", settings, overwrite=overwrite, check_config=False,
                      owned_names=("study.json",)) as study_claim:
        study_claim.write_record()
        for number, stage in enumerate(stages, start=1):
            config = finite_or_none(stage.config(settings, inputs))
            folder = stage.path(out)
            refresh_threads()  # a competing job may have started or stopped since the last stage
            started = time.perf_counter()
            print(f"\n== {number}/{len(stages)} {stage.name}" + (f" -> {folder}" if folder else ""), flush=True)
            missing = [need for need in stage.needs if need not in ctx.results]
            if missing:
                status[stage.name] = {"status": "skipped", "config": config,
                                      "error": f"needs stage {missing[0]!r}, which did not finish"}
                print(f"   skipped: needs {missing[0]}, which did not finish")
                continue
            try:
                if folder is None:
                    ctx.results[stage.name] = stage.run(ctx, out)
                    state = "done"
                else:
                    with claim_output(folder, f"study:{stage.name}", config, overwrite=overwrite,
                                      owned_names=stage.owned) as claim:
                        if claim.finished and stage.load is not None:
                            ctx.results[stage.name] = stage.load(ctx, folder)
                            state = "resumed"
                            print("   (done already with the same settings; skipped)")
                        else:
                            ctx.results[stage.name] = stage.run(ctx, folder)
                            claim.finish()
                            state = "done"
                status[stage.name] = {"status": state, "config": config,
                                      "seconds": round(time.perf_counter() - started, 2)}
                print(f"   {state} in {time.perf_counter() - started:.1f} s", flush=True)
            except Exception as error:  # noqa: BLE001 - a failing stage is recorded; the others still run
                message = " ".join(str(error).split()) or type(error).__name__
                status[stage.name] = {"status": "failed", "config": config, "error": f"{type(error).__name__}: {message}",
                                      "seconds": round(time.perf_counter() - started, 2)}
                print(f"   FAILED: {type(error).__name__}: {message}", flush=True)
            # study.json after every stage: an interrupted study still says what finished
            StudyResult(out, settings, status, time.perf_counter() - ctx.started).save()
            release_memory()  # the stage's freed memory goes back to the OS: peaks do not stack
        result = StudyResult(out, settings, status, time.perf_counter() - ctx.started)
        result.save()
        study_claim.finish({"stages": {name: s["status"] for name, s in status.items()}})
    return result
