"""The main job on one model, end to end, into one output folder: a list of stages.

:func:`run_study` takes a loaded model (loaded once, by the caller) and the inputs, and runs
each :class:`Stage` in order, each into its own sub-folder:

1. ``capture/``: every layer's residual stream, input surprise and output entropy;
2. ``fit_surprise/``, ``fit_entropy/``: ridge probes at every layer, with controls;
3. ``steer/``: steering along the best surprise direction (dose-response against random
   directions) and its directional ablation;
4. ``index.html`` + ``token_view.html`` (the ``report`` stage): links to every figure.

Each stage records its settings (``<stage>/config.json``). A rerun skips a finished stage whose
settings match, refuses one whose settings differ (naming the setting), or, with
``overwrite=True``, recomputes it. A stage that fails is recorded in ``study.json`` with its
error and the stages that do not need it still run. Later stages (policy gap, intention,
report) are appended to the list: ``run_study(..., stages=[*default_stages(), my_stage])``.

The study lives in the app layer: no library module imports it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from surprise_probe.capture import capture, token_metrics
from surprise_probe.interventions.experiments import steering_experiment
from surprise_probe.jsonio import (
    finite_or_none,
    read_json,
    software_versions,
    write_json,
    write_text,
)
from surprise_probe.models import model_id
from surprise_probe.outputs import claim_output, config_record_path, first_difference
from surprise_probe.plots import token_view, write_html
from surprise_probe.probes import ProbeDirection
from surprise_probe.probes.fit import fit_probes
from surprise_probe.store import load_capture
from surprise_probe.summary import summarize_capture

__all__ = ["Stage", "StudyContext", "StudyResult", "run_study", "default_stages", "check_stages", "DEFAULT_SETTINGS"]

DEFAULT_SETTINGS = {
    "batch_size": 8,
    "steer_inputs": 8,
    "strengths": [-4.0, -2.0, 0.0, 2.0, 4.0],
    "random_directions": 4,
    "n_boot": 1000,
    "seed": 0,
}


@dataclass
class StudyContext:
    """What stages share: the model (loaded once), the inputs, settings, and earlier stages' results."""

    model: object
    items: list
    out: Path
    settings: dict
    model_name: str
    results: dict = field(default_factory=dict)
    progress: bool = True


@dataclass
class Stage:
    """One step of the study.

    ``config(settings, items_hash)`` -> the settings that define this stage's result (recorded and
    compared on resume; it must not need the model, so a mismatch is found before loading one);
    ``run(ctx, folder)`` computes and saves into ``folder`` and returns the result later stages use;
    ``load(ctx, folder)`` returns that result from a finished folder; ``needs``: stages it uses.
    ``folder=None`` writes into the study folder itself and always reruns (cheap stages only).
    """

    name: str
    config: Callable[[dict, str], dict]
    run: Callable[[StudyContext, Path], object]
    load: Callable[[StudyContext, Path], object] | None = None
    needs: tuple[str, ...] = ()
    folder: str | None = ""

    def path(self, out: Path) -> Path | None:
        if self.folder is None:
            return None
        return out / (self.folder or self.name)


def items_hash(items: Sequence) -> str:
    """A hash of the inputs themselves (texts, conversations, ids), so other inputs are another config."""
    return hashlib.sha256(json.dumps(finite_or_none(list(items)), sort_keys=True).encode()).hexdigest()[:16]


# --- the default stages -----------------------------------------------------------------------------

def _capture_config(settings: dict, inputs: str) -> dict:
    return {"model": settings["model"], "inputs": inputs, "batch_size": settings["batch_size"],
            "dtype": settings.get("dtype", "float32")}


def _run_capture(ctx: StudyContext, folder: Path):
    run = capture(ctx.model, ctx.items, out_dir=folder, batch_size=ctx.settings["batch_size"], progress=ctx.progress)
    summarize_capture(run, n_boot=ctx.settings["n_boot"], seed=ctx.settings["seed"]).save(folder)
    return run


def _fit_stage(target: str) -> Stage:
    def config(settings: dict, inputs: str) -> dict:
        return {**_capture_config(settings, inputs), "target": target, "n_boot": settings["n_boot"],
                "seed": settings["seed"]}

    def run(ctx: StudyContext, folder: Path):
        fit = fit_probes(ctx.results["capture"], target, n_boot=ctx.settings["n_boot"], seed=ctx.settings["seed"],
                         progress=ctx.progress)
        fit.save(folder)
        return folder / "probe"

    return Stage(f"fit_{target}", config, run, load=lambda ctx, folder: folder / "probe", needs=("capture",))


def _steer_config(settings: dict, inputs: str) -> dict:
    keys = ("steer_inputs", "strengths", "random_directions", "n_boot", "seed")
    return {**_capture_config(settings, inputs), **{k: settings[k] for k in keys}}


def _run_steer(ctx: StudyContext, folder: Path):
    probe_path = ctx.results["fit_surprise"]
    probe = ProbeDirection.load(probe_path, model=ctx.model)
    settings = ctx.settings
    result = steering_experiment(
        ctx.model, ctx.items[: settings["steer_inputs"]], probe, settings["strengths"], probe_path=probe_path,
        random_directions=settings["random_directions"], n_boot=settings["n_boot"], seed=settings["seed"],
        progress=ctx.progress, config=_steer_config(settings, ""),
    )
    result.save(folder)
    return result


_LINKS = [
    ("token_view.html", "Token view: per-token input surprise and output entropy of one input"),
    ("fit_surprise/sweep.html", "Layer sweep: decoding input surprise, with controls"),
    ("fit_entropy/sweep.html", "Layer sweep: decoding output entropy, with controls"),
    ("steer/dose_response.html", "Dose-response: steering along the surprise direction vs random directions"),
    ("steer/ablation.html", "Directional ablation: projecting the surprise direction out vs random directions"),
]


def _run_report(ctx: StudyContext, out: Path):
    m = token_metrics(ctx.model, ctx.items[0])
    first = max(0, int(m.scored.argmax()) - 8)
    window = slice(first, first + 96)
    write_html(token_view(m.tokens[window], m.input_surprise[window], m.output_entropy[window], m.scored[window],
                          title=f"{ctx.model_name} reading input 0 of {ctx.settings.get('input', 'the inputs')}"),
               out / "token_view.html")
    links = "\n".join(f"<li><a href='{href}'>{text}</a></li>" for href, text in _LINKS if (out / href).exists())
    title = f"surprise-probe study: {ctx.model_name}"
    write_text(out / "index.html",
        f"<html><head><meta charset='utf-8'><title>{title}</title></head><body style='font-family: sans-serif'>"
        f"<h1>{title}</h1><p>Inputs: {ctx.settings.get('input', '')} ({len(ctx.items)} items). Numbers, "
        f"sample sizes and controls: the JSON files in each folder; stage status: study.json.</p>"
        f"<ul>{links}</ul></body></html>",
    )
    return out / "index.html"


def default_stages() -> list[Stage]:
    """capture -> fit_surprise, fit_entropy -> steer -> report."""
    return [
        Stage("capture", _capture_config, _run_capture, load=lambda ctx, folder: load_capture(folder)),
        _fit_stage("surprise"),
        _fit_stage("entropy"),
        Stage("steer", _steer_config, _run_steer, load=lambda ctx, folder: read_json(folder / "steer.json"),
              needs=("fit_surprise",)),
        Stage("report", lambda settings, inputs: {}, _run_report, folder=None),
    ]


# --- running ----------------------------------------------------------------------------------------

@dataclass
class StudyResult:
    """Per stage: status (``done``, ``resumed``, ``failed``, ``skipped``), settings, seconds, error."""

    out: Path
    settings: dict
    stages: dict

    @property
    def ok(self) -> bool:
        return all(s["status"] in ("done", "resumed") for s in self.stages.values())

    def to_dict(self) -> dict:
        return {"command": "study", "settings": self.settings, "stages": self.stages,
                "software_versions": software_versions()}

    def save(self, folder: str | Path | None = None) -> dict[str, Path]:
        return {"json": write_json(Path(folder or self.out) / "study.json", self.to_dict())}


def check_stages(out: str | Path, settings: dict, items: Sequence, stages: Sequence[Stage] | None = None) -> None:
    """Refuse (``FileExistsError``) a rerun whose settings differ from a finished stage's, before any model loads."""
    out, inputs = Path(out), items_hash(items)
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
    ctx = StudyContext(model, items, out, settings, str(settings["model"]), progress=progress)
    status: dict[str, dict] = {}
    with claim_output(out, "study", settings, overwrite=overwrite, check_config=False,
                      owned_names=("study.json",)) as study_claim:
        study_claim.write_record()
        for number, stage in enumerate(stages, start=1):
            config = finite_or_none(stage.config(settings, inputs))
            folder = stage.path(out)
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
                                      owned_names=("run.json", "sweep.json", "steer.json")) as claim:
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
            except Exception as error:  # noqa: BLE001 - a failing stage is recorded; the others still run
                message = " ".join(str(error).split()) or type(error).__name__
                status[stage.name] = {"status": "failed", "config": config, "error": f"{type(error).__name__}: {message}",
                                      "seconds": round(time.perf_counter() - started, 2)}
                print(f"   FAILED: {type(error).__name__}: {message}")
        result = StudyResult(out, settings, status)
        result.save()
        study_claim.finish({"stages": {name: s["status"] for name, s in status.items()}})
    return result
