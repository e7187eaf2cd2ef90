"""The main job on one model, end to end, into one output folder: a list of stages.

:func:`run_study` takes a loaded model (loaded once, by the caller) and the inputs, and runs
each :class:`Stage` in order, each into its own sub-folder:

1. ``capture/``: every layer's residual stream, input surprise and output entropy;
2. ``fit_surprise/``, ``fit_entropy/``: ridge probes at every layer, with controls (and the
   probe direction at every hook, ``directions/``);
3. ``steer/``: steering along the best surprise direction (dose-response against random
   directions) and its directional ablation;
4. ``compare/``: the same dose-response along the entropy probe's directions, side by side with
   the surprise direction (is it the surprise direction, or any entropy-related one?);
5. ``patch/``: activation patching along the surprise direction between on-policy reads (the
   model's own sampled answer, exact ids) and off-policy reads (its answer to a prompt of another
   topic, read under this prompt), with the pairs saved in ``pairs.json``;
6. ``attribution/``: attribution patching on the same pairs, validated against exact patching,
   and the token view's data (one input, every per-token quantity at every layer);
7. ``gap/``: the on/off-policy entropy gap, read by the model and, when installed, by a base
   model (``base_reader``, e.g. gemma-3-270m);
8. ``intention/``: the cached-intention analysis on open-ended prompts;
9. ``report.html`` (the ``report`` stage): one self-contained page with every stage's figure,
   numbers (CI, control, n) and links to its JSON; ``index.html`` points to it.

Each stage records its settings (``<stage>/config.json``). A rerun skips a finished stage whose
settings match, refuses one whose settings differ (naming the setting), or, with
``overwrite=True``, recomputes it. A stage that fails is recorded in ``study.json`` with its
error, the stages that do not need it still run, and the report names it.
Other stages can be added: ``run_study(..., stages=[*default_stages()[:-1], my_stage, report])``.

The study lives in the app layer: no library module imports it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surprise_probe.capture import capture
from surprise_probe.devices import release_memory
from surprise_probe.generate import sample_responses
from surprise_probe.intention import analyze_intention, builtin_intention_prompts
from surprise_probe.interventions.attribution import validate_attribution
from surprise_probe.interventions.direction_comparison import entropy_direction_comparison
from surprise_probe.interventions.experiments import (
    patching_experiment,
    probe_artifact,
    steering_experiment,
)
from surprise_probe.io import builtin_items
from surprise_probe.jsonio import (
    finite_or_none,
    read_json,
    software_versions,
    write_json,
    write_text,
)
from surprise_probe.models import EMBEDDED_MODELS, load_model, model_id
from surprise_probe.outputs import claim_output, config_record_path, first_difference
from surprise_probe.policy import builtin_gap_prompts, policy_gap
from surprise_probe.probes import ProbeDirection
from surprise_probe.probes.fit import fit_probes
from surprise_probe.report import write_study_report
from surprise_probe.store import load_capture
from surprise_probe.summary import summarize_capture
from surprise_probe.token_view import token_view_data

__all__ = [
    "Stage",
    "StudyContext",
    "StudyResult",
    "run_study",
    "default_stages",
    "check_stages",
    "estimate_seconds",
    "calibration_forward_seconds",
    "describe_sizes",
    "patch_layers",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
]

# Sizes of the default study: under 15 minutes on 2 CPU cores with the embedded SmolLM2-135M
# (docs/index.md gives the measured time per stage).
DEFAULT_SETTINGS = {
    "max_inputs": 60,  # the first N inputs are captured and probed
    "batch_size": 8,
    "steer_inputs": 6,
    "strengths": [-4.0, -2.0, 0.0, 2.0, 4.0],
    "compare_strengths": [-4.0, 0.0, 4.0],  # the entropy-direction comparison (3 directions, so fewer)
    "random_directions": 4,
    "n_boot": 1000,
    "seed": 0,
    "patch_pairs": 6,  # on/off-policy pairs (the model samples one answer per pair)
    "patch_layers": 8,  # evenly spaced layers patched exactly (and validated by attribution)
    "patch_random_directions": 2,  # random directions patched like the probe direction (the control)
    "sample_tokens": 48,  # longest sampled answer (patch pairs and policy gap)
    "token_view_tokens": 112,
    "gap_prompts": 16,
    "base_reader": None,  # e.g. "gemma-3-270m": a base model that also reads and writes in the gap
    "intention_prompts": 4,  # prompt groups (x 3 phrasings each)
    "intention_samples": 6,
    "intention_tokens": 16,
    "intention_ks": [0, 1, 2, 4, 8],
}

# --quick: every stage on small sizes (2.6 min of stages, 2.8 min wall with the load, peak 2.2 GB on
# the embedded default, 2 idle cores, 2026-11-24; CI's smoke run).
QUICK_SETTINGS = {
    **DEFAULT_SETTINGS,
    "max_inputs": 12,
    "steer_inputs": 2,
    "strengths": [-4.0, 0.0, 4.0],
    "random_directions": 1,
    "n_boot": 200,
    "patch_pairs": 4,
    "patch_layers": 4,
    "patch_random_directions": 1,
    "sample_tokens": 24,
    "token_view_tokens": 64,
    "gap_prompts": 6,
    "intention_prompts": 2,
    "intention_samples": 4,
    "intention_tokens": 10,
    "intention_ks": [0, 1, 4],
}

PATCH_GROUPS = ("response", "first4")


@dataclass
class StudyContext:
    """What stages share: the model (loaded once), the inputs, settings, earlier stages' results
    and status (``status``: stage name -> status record, for the report)."""

    model: object
    items: list
    out: Path
    settings: dict
    model_name: str
    results: dict = field(default_factory=dict)
    progress: bool = True
    status: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Stage:
    """One step of the study.

    ``config(settings, items_hash)`` -> the settings that define this stage's result (recorded and
    compared on resume; it must not need the model, so a mismatch is found before loading one);
    ``run(ctx, folder)`` computes and saves into ``folder`` and returns the result later stages use;
    ``load(ctx, folder)`` returns that result from a finished folder; ``needs``: stages it uses.
    ``folder=None`` writes into the study folder itself and always reruns (cheap stages only).
    ``owned``: the file whose presence marks a folder written by this stage.
    """

    name: str
    config: Callable[[dict, str], dict]
    run: Callable[[StudyContext, Path], object]
    load: Callable[[StudyContext, Path], object] | None = None
    needs: tuple[str, ...] = ()
    folder: str | None = ""
    owned: tuple[str, ...] = ()

    def path(self, out: Path) -> Path | None:
        if self.folder is None:
            return None
        return out / (self.folder or self.name)


def items_hash(items: Sequence) -> str:
    """A hash of the inputs themselves (texts, conversations, ids), so other inputs are another config."""
    return hashlib.sha256(json.dumps(finite_or_none(list(items)), sort_keys=True).encode()).hexdigest()[:16]


def patch_layers(n_layers: int, count: int) -> list[int]:
    """``count`` evenly spaced layers from 0 to ``n_layers - 1`` (all when ``count >= n_layers``).

    >>> patch_layers(30, 4), patch_layers(3, 10)
    ([0, 10, 19, 29], [0, 1, 2])
    """
    if count >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(v)) for v in np.linspace(0, n_layers - 1, max(1, count))})


def _keys(settings: dict, *names: str) -> dict:
    return {name: settings[name] for name in names}


# --- capture and probes -----------------------------------------------------------------------------

def _capture_config(settings: dict, inputs: str) -> dict:
    return {"model": settings["model"], "inputs": inputs, "batch_size": settings["batch_size"],
            "dtype": settings.get("dtype", "float32")}


def _run_capture(ctx: StudyContext, folder: Path):
    run = capture(ctx.model, ctx.items, out_dir=folder, batch_size=ctx.settings["batch_size"], progress=ctx.progress)
    summarize_capture(run, n_boot=ctx.settings["n_boot"], seed=ctx.settings["seed"]).save(folder)
    return run


def direction_path(folder: Path, hook: str) -> Path:
    """Where a fit stage keeps the probe direction at ``hook`` (``directions/blocks_5_hook_resid_post``)."""
    return folder / "directions" / hook.replace(".", "_")


def _fit_stage(target: str) -> Stage:
    def config(settings: dict, inputs: str) -> dict:
        return {**_capture_config(settings, inputs), "target": target, "n_boot": settings["n_boot"],
                "seed": settings["seed"]}

    def run(ctx: StudyContext, folder: Path):
        fit = fit_probes(ctx.results["capture"], target, n_boot=ctx.settings["n_boot"], seed=ctx.settings["seed"],
                         progress=ctx.progress)
        for result in fit.sweep.hooks:  # every layer's direction: the token view decodes at each
            if float(np.linalg.norm(result.coef)) > 0:
                fit.sweep.direction(result.hook).save(direction_path(folder, result.hook))
        fit.save(folder)
        return folder / "probe"

    return Stage(f"fit_{target}", config, run, load=lambda ctx, folder: folder / "probe", needs=("capture",),
                 owned=("sweep.json",))


# --- steering and the entropy-direction comparison --------------------------------------------------

def _steer_config(settings: dict, inputs: str) -> dict:
    return {**_capture_config(settings, inputs),
            **_keys(settings, "steer_inputs", "strengths", "random_directions", "n_boot", "seed")}


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


def _run_compare(ctx: StudyContext, folder: Path):
    surprise = ProbeDirection.load(ctx.results["fit_surprise"], model=ctx.model)
    entropy_folder = Path(ctx.results["fit_entropy"]).parent
    entropy_best = ProbeDirection.load(ctx.results["fit_entropy"], model=ctx.model)
    directions = {f"entropy (best hook, {entropy_best.hook})": entropy_best}
    at_surprise_hook = direction_path(entropy_folder, surprise.hook)
    if entropy_best.hook != surprise.hook and at_surprise_hook.with_name(at_surprise_hook.name + ".json").exists():
        directions[f"entropy (surprise hook, {surprise.hook})"] = ProbeDirection.load(at_surprise_hook, model=ctx.model)
    settings = ctx.settings
    result = entropy_direction_comparison(
        ctx.model, ctx.items[: settings["steer_inputs"]], surprise, directions, settings["compare_strengths"],
        random_directions=settings["random_directions"], n_boot=settings["n_boot"], seed=settings["seed"],
        progress=ctx.progress,
    )
    result.save(folder)
    return folder / "direction_comparison.json"


# --- patching and attribution -----------------------------------------------------------------------

def _patch_config(settings: dict, inputs: str) -> dict:
    return {**_capture_config(settings, inputs),
            **_keys(settings, "patch_pairs", "patch_layers", "patch_random_directions", "sample_tokens", "n_boot",
                    "seed"),
            "groups": list(PATCH_GROUPS)}


def build_policy_pairs(model, n_pairs: int, *, max_new_tokens: int, seed: int, progress: bool = True) -> list[dict]:
    """On/off-policy pairs under one prompt, as the patch experiment in docs/results.md builds them.

    The model samples one answer (temperature 1, exact ids kept) to each of ``n_pairs`` built-in
    prompts spread over topics; pair ``i``: source = its own answer to prompt ``i`` (on-policy),
    destination = its own answer to a prompt of another topic, read as the assistant turn after
    prompt ``i`` (off-policy; identical templating).
    """
    items = builtin_items()
    step = max(1, len(items) // max(1, n_pairs))
    picked = items[::step][:n_pairs]
    if len(picked) < 2:
        raise ValueError(f"patch_pairs must be at least 2 (a destination needs another prompt), got {n_pairs}")
    prompts = [item["messages"][0]["content"] for item in picked]
    sampled = sample_responses(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                               progress=progress)
    pairs = []
    for i, (item, own) in enumerate(zip(picked, sampled, strict=True)):
        j = next(j for j in [(i + k) % len(picked) for k in range(len(picked) // 2, len(picked) + len(picked) // 2)]
                 if picked[j]["topic"] != item["topic"] or len(picked) == 1)
        pairs.append({
            "id": item["id"],
            "source": {"token_ids": own["token_ids"], "scored": own["scored"]},
            "destination": {"messages": [item["messages"][0],
                                         {"role": "assistant", "content": sampled[j]["text"]}]},
            "source_text": own["text"],
            "destination_answer_from": picked[j]["id"],
        })
    return pairs


def _run_patch(ctx: StudyContext, folder: Path):
    settings = ctx.settings
    probe_path = ctx.results["fit_surprise"]
    probe = ProbeDirection.load(probe_path, model=ctx.model)
    pairs = build_policy_pairs(ctx.model, settings["patch_pairs"], max_new_tokens=settings["sample_tokens"],
                               seed=settings["seed"], progress=ctx.progress)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "pairs.json", {"pairs": pairs, "n_pairs": len(pairs),
                                       "protocol": build_policy_pairs.__doc__.split("\n\n")[1].strip()})
    layers = patch_layers(int(ctx.model.cfg.n_layers), settings["patch_layers"])
    result = patching_experiment(
        ctx.model, [(p["source"], p["destination"]) for p in pairs], probe, probe_path=probe_path, layers=layers,
        groups=PATCH_GROUPS, random_directions=settings["patch_random_directions"], n_boot=settings["n_boot"],
        seed=settings["seed"], progress=ctx.progress, config=_patch_config(settings, ""),
    )
    result.save(folder)
    return folder


def _attribution_config(settings: dict, inputs: str) -> dict:
    return {**_patch_config(settings, inputs), "token_view_tokens": settings["token_view_tokens"],
            "strength": max(abs(s) for s in settings["strengths"])}


def _patched_moves(patch_folder: Path, probe_path: Path, hooks: list[str], n_pairs: int) -> np.ndarray | None:
    """The patch stage's per-pair entropy moves along the probe direction, ``[pair][hook][group]``:
    exactly what attribution's validation would patch again (same pairs, probe, layers and
    groups), or ``None`` when patch.json does not hold them for these (an older run)."""
    record = read_json(patch_folder / "patch.json")
    patching = record.get("patching", {})
    moved = patching.get("per_pair_moved", {}).get("direction")
    if (moved is None or record.get("probe", {}).get("sha256") != probe_artifact(probe_path)["sha256"]
            or patching.get("hooks") != hooks or patching.get("groups") != list(PATCH_GROUPS)
            or patching.get("n_pairs") != n_pairs
            or any(cell is None for row in moved for cell in row)):
        return None
    return np.asarray(moved, dtype=float).transpose(2, 0, 1)


def _run_attribution(ctx: StudyContext, folder: Path):
    settings = ctx.settings
    probe_path = Path(ctx.results["fit_surprise"])
    probe = ProbeDirection.load(probe_path, model=ctx.model)
    pairs = read_json(Path(ctx.results["patch"]) / "pairs.json")["pairs"]
    hooks = [f"blocks.{layer}.hook_resid_post"
             for layer in patch_layers(int(ctx.model.cfg.n_layers), settings["patch_layers"])]
    validate_attribution(ctx.model, [(p["source"], p["destination"]) for p in pairs], direction=probe, hooks=hooks,
                         groups=PATCH_GROUPS, progress=ctx.progress,
                         exact=_patched_moves(Path(ctx.results["patch"]), probe_path, hooks, len(pairs))).save(folder)
    probes = {}
    for layer in range(int(ctx.model.cfg.n_layers)):
        hook = f"blocks.{layer}.hook_resid_post"
        path = direction_path(probe_path.parent, hook)
        if path.with_name(path.name + ".json").exists():
            probes[hook] = ProbeDirection.load(path, model=ctx.model)
    strength = max(abs(s) for s in settings["strengths"]) or 1.0
    token_view_data(ctx.model, ctx.items[0], probe, probes=probes, strength=strength,
                    max_tokens=settings["token_view_tokens"],
                    title=f"{ctx.model_name} reading input 0 of {settings.get('input', 'the inputs')}").save(folder)
    return folder


# --- policy gap and cached intention ----------------------------------------------------------------

def _gap_config(settings: dict, inputs: str) -> dict:
    return {"model": settings["model"], "dtype": settings.get("dtype", "float32"), "probe_inputs": inputs,
            **_keys(settings, "gap_prompts", "base_reader", "sample_tokens", "n_boot", "seed", "batch_size")}


def _run_gap(ctx: StudyContext, folder: Path):
    settings = ctx.settings
    models: dict[str, object] = {ctx.model_name: ctx.model}
    post_trained = {}
    for name in (ctx.model_name, settings.get("base_reader")):
        if name and name.lower() in EMBEDDED_MODELS:
            post_trained[name] = EMBEDDED_MODELS[name.lower()].post_trained
    base = settings.get("base_reader")
    if base:
        models[base] = lambda: load_model(base, device=settings.get("device", "auto"),
                                          dtype=settings.get("dtype", "float32"), progress=ctx.progress)
    probe = ctx.results.get("fit_surprise")
    result = policy_gap(
        models, builtin_gap_prompts()[: settings["gap_prompts"]], max_new_tokens=settings["sample_tokens"],
        seed=settings["seed"], batch_size=settings["batch_size"], probe_path=probe, work_dir=folder,
        n_boot=settings["n_boot"], progress=ctx.progress, post_trained=post_trained or None,
    )
    result.save(folder)
    return folder / "gap.json"


def _intention_config(settings: dict, inputs: str) -> dict:
    return {"model": settings["model"], "dtype": settings.get("dtype", "float32"),
            **_keys(settings, "intention_prompts", "intention_samples", "intention_tokens", "intention_ks",
                    "n_boot", "seed")}


def _run_intention(ctx: StudyContext, folder: Path):
    settings = ctx.settings
    prompts = builtin_intention_prompts()
    groups = list(dict.fromkeys(p.group for p in prompts))[: settings["intention_prompts"]]
    result = analyze_intention(
        [ctx.model], [p for p in prompts if p.group in groups], cache_dir=folder / "samples", progress=ctx.progress,
        n_samples=settings["intention_samples"], max_new_tokens=settings["intention_tokens"],
        ks=tuple(settings["intention_ks"]), n_boot=settings["n_boot"], seed=settings["seed"],
        n_folds=min(5, max(2, len(groups))),
    )
    result.save(folder)
    return folder / "intention.json"


# --- the report -------------------------------------------------------------------------------------

def _run_report(ctx: StudyContext, out: Path):
    path = write_study_report(out, stages=dict(ctx.status), settings=ctx.settings,
                              total_seconds=time.perf_counter() - ctx.started)
    # index.html only points to the report (a folder listing opens it)
    write_text(out / "index.html",
               "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='0; url=report.html'>"
               "<title>surprise-probe study</title></head><body><a href='report.html'>report.html</a></body></html>\n")
    return path


def default_stages() -> list[Stage]:
    """capture -> fit_surprise, fit_entropy -> steer -> compare -> patch -> attribution -> gap -> intention -> report."""
    return [
        Stage("capture", _capture_config, _run_capture, load=lambda ctx, folder: load_capture(folder),
              owned=("manifest.json", "run.json")),
        _fit_stage("surprise"),
        _fit_stage("entropy"),
        Stage("steer", _steer_config, _run_steer, load=lambda ctx, folder: read_json(folder / "steer.json"),
              needs=("fit_surprise",), owned=("steer.json",)),
        Stage("compare", lambda s, i: {**_steer_config(s, i), "compare_strengths": s["compare_strengths"],
                                       "directions": "surprise vs entropy"}, _run_compare,
              load=lambda ctx, folder: folder / "direction_comparison.json", needs=("fit_surprise", "fit_entropy"),
              owned=("direction_comparison.json",)),
        Stage("patch", _patch_config, _run_patch, load=lambda ctx, folder: folder, needs=("fit_surprise",),
              owned=("patch.json",)),
        Stage("attribution", _attribution_config, _run_attribution, load=lambda ctx, folder: folder,
              needs=("fit_surprise", "patch"), owned=("attribution.json",)),
        Stage("gap", _gap_config, _run_gap, load=lambda ctx, folder: folder / "gap.json", owned=("gap.json",)),
        Stage("intention", _intention_config, _run_intention, load=lambda ctx, folder: folder / "intention.json",
              owned=("intention.json",)),
        Stage("report", lambda settings, inputs: {}, _run_report, folder=None),
    ]


# --- sizes and the time estimate --------------------------------------------------------------------

def describe_sizes(settings: dict, n_items: int) -> str:
    """The sizes a study runs at, one line per stage (printed at the start)."""
    s = settings
    base = s.get("base_reader") or "none"
    return "\n".join([
        f"  capture + probes : {n_items} inputs, every layer; bootstrap {s['n_boot']}",
        f"  steer + compare  : {s['steer_inputs']} inputs x strengths {s['strengths']} x (probe, orthogonal, "
        f"{s['random_directions']} random); compare: 3 directions x {s['compare_strengths']}",
        f"  patch + attribution: {s['patch_pairs']} on/off-policy pairs (answers up to {s['sample_tokens']} tokens), "
        f"{s['patch_layers']} layers, {s['patch_random_directions']} random directions; token view "
        f"{s['token_view_tokens']} tokens",
        f"  policy gap       : {s['gap_prompts']} prompts, base reader: {base}",
        f"  intention        : {s['intention_prompts']} prompts x 3 phrasings x {s['intention_samples']} samples "
        f"of {s['intention_tokens']} tokens, ks {s['intention_ks']}",
    ])


def calibration_forward_seconds(model) -> float:
    """Seconds of one forward pass over 8 x 128 tokens (fewer if the context is shorter, scaled up)."""
    import torch

    length = max(2, min(128, int(model.cfg.n_ctx)))
    tokens = torch.randint(0, int(model.cfg.d_vocab), (8, length), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.no_grad():
        model(tokens[:1, :8].to(device), return_type="logits")  # warm-up: the first call pays one-off costs
        started = time.perf_counter()
        model(tokens.to(device), return_type="logits")
        seconds = time.perf_counter() - started
    return seconds * 128 / length


def estimate_seconds(settings: dict, n_items: int, forward_seconds: float, n_layers: int,
                     base_reader: str | None = None) -> dict[str, float]:
    """A rough time per stage (seconds), scaled by ``forward_seconds`` (one 8 x 128-token forward).

    Unit costs were measured on the embedded default (SmolLM2-135M, 2 CPU cores); other models and
    machines scale with the calibration forward. It is an estimate (+/- 50%), printed at the start.
    A base reader adds its load (longer the first time, while its cache is built) and its sampling.

    >>> est = estimate_seconds(QUICK_SETTINGS, 16, 2.0, 30)
    >>> sorted(est) == sorted(stage.name for stage in default_stages()), all(v > 0 for v in est.values())
    (True, True)
    """
    f = forward_seconds
    s = settings
    base_reader_seconds = 0.0
    if base_reader:
        from surprise_probe.models import available_models

        cached = {row["name"]: row["cached"] for row in available_models()}.get(base_reader, False)
        # Its load, then its sampling and reading and the model's reading of its answers: 133 s for
        # the whole gap stage with gemma-3-270m (cached) at the default sizes, f = 2.41 s (2026-11-24).
        base_reader_seconds = (30.0 if cached else 150.0) + 0.021 * f * s["gap_prompts"] * (s["sample_tokens"] + 12)
    strengths, controls = len(s["strengths"]), s["random_directions"] + 2
    layers = patch_layers(n_layers, s["patch_layers"])
    # A fit: about 1 s per hook whatever the corpus (nested CV, controls, bootstrap) plus the data:
    # 30.8 / 31.3 s at 12 items (the quick study), 36.7 / 35.9 s at 60 items, 31 hooks.
    fit = (n_layers + 1) * (0.93 + 0.0049 * n_items)
    # unit costs from the default study on a fresh clone (2026-11-24, 2 idle cores, f = 2.13 s)
    est = {
        "capture": 0.33 * f * n_items,
        "fit_surprise": fit,
        "fit_entropy": fit,
        "steer": 0.11 * f * s["steer_inputs"] * (strengths * controls + controls),
        "compare": 0.093 * f * s["steer_inputs"] * len(s["compare_strengths"]) * (s["random_directions"] + 1) * 3,
        "patch": 0.0224 * f * s["patch_pairs"] * (s["sample_tokens"] + (2 + s["patch_random_directions"]) * 2
                                                   * len(layers) * len(PATCH_GROUPS)),
        "attribution": 0.0154 * f * (s["patch_pairs"] * (6 + len(layers) * len(PATCH_GROUPS))
                                     + s["token_view_tokens"] * n_layers / 4),
        "gap": 0.024 * f * s["gap_prompts"] * (s["sample_tokens"] + 12) + base_reader_seconds,
        "intention": 0.00244 * f * s["intention_prompts"] * 3 * s["intention_samples"]
                     * s["intention_tokens"] * (2 + len(s["intention_ks"])),
        "report": 5.0,
    }
    return {name: round(value, 1) for name, value in est.items()}


# --- running ----------------------------------------------------------------------------------------

@dataclass
class StudyResult:
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
    ctx = StudyContext(model, items, out, settings, str(settings["model"]), progress=progress)
    status = ctx.status
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
