"""The study's stages: what each computes, the settings that define it, and its report sections.

A section may carry a question (``SectionSpec.question``, a key of
``surprise_probe.report.verdicts.QUESTIONS``): the report opens with its verdict, judged from
that stage's results by the rule printed beside it.
"""


from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surprise_probe.analyses.intention.analysis import analyze_intention
from surprise_probe.analyses.intention.prompts import builtin_intention_prompts
from surprise_probe.analyses.policy.gap import policy_gap
from surprise_probe.analyses.policy.prompts import builtin_gap_prompts
from surprise_probe.analyses.token_view import token_view_data
from surprise_probe.app.study.settings import PATCH_GROUPS, patch_layers
from surprise_probe.core.capture.run import capture
from surprise_probe.core.capture.store import load_capture
from surprise_probe.core.capture.summary import summarize_capture
from surprise_probe.core.forward.hooks import resid_post, resid_post_hooks
from surprise_probe.core.forward.responses import sample_responses
from surprise_probe.core.models.loading import (
    EMBEDDED_MODELS,
    load_model,
)
from surprise_probe.core.text.files import builtin_items
from surprise_probe.core.utils.jsonio import (
    finite_or_none,
    read_json,
    write_json,
    write_text,
)
from surprise_probe.interventions.attribution import validate_attribution
from surprise_probe.interventions.direction_comparison import entropy_direction_comparison
from surprise_probe.interventions.experiments import (
    patching_experiment,
    probe_artifact,
    steering_experiment,
)
from surprise_probe.interventions.norm_control import norm_control
from surprise_probe.probes import ProbeDirection
from surprise_probe.probes.fit import fit_probes
from surprise_probe.report import (
    SectionSpec,
    attribution_section,
    capture_section,
    compare_section,
    fit_section,
    gap_section,
    intention_section,
    norm_section,
    patch_section,
    steer_section,
    token_view_section,
    write_study_report,
)


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
    stages: list = field(default_factory=list)  # the stages being run (the report shows their sections)
    directions: dict = field(default_factory=dict)  # probe path -> ProbeDirection, one object per probe

    def direction(self, path: str | Path) -> ProbeDirection:
        """The probe direction saved at ``path``: the fit stage's own object when it ran in this
        process, else read (and verified) once; every later stage shares it. The path stays for
        provenance (its hash is recorded beside each result)."""
        key = str(Path(path))
        if key not in self.directions:
            self.directions[key] = ProbeDirection.load(path, model=self.model)
        return self.directions[key]


@dataclass
class Stage:
    """One step of the study.

    ``config(settings, items_hash)`` -> the settings that define this stage's result (recorded and
    compared on resume; it must not need the model, so a mismatch is found before loading one);
    ``run(ctx, folder)`` computes and saves into ``folder`` and returns the result later stages use;
    ``load(ctx, folder)`` returns that result from a finished folder; ``needs``: stages it uses.
    ``folder=None`` writes into the study folder itself and always reruns (cheap stages only).
    ``owned``: the file whose presence marks a folder written by this stage. ``sections``: its
    report sections (the report renders the stages' sections in the order of the stages).
    """

    name: str
    config: Callable[[dict, str], dict]
    run: Callable[[StudyContext, Path], object]
    load: Callable[[StudyContext, Path], object] | None = None
    needs: tuple[str, ...] = ()
    folder: str | None = ""
    owned: tuple[str, ...] = ()
    sections: tuple[SectionSpec, ...] = ()  # what the report shows of this stage, in order

    def path(self, out: Path) -> Path | None:
        if self.folder is None:
            return None
        return out / (self.folder or self.name)


def items_hash(items: Sequence) -> str:
    """A hash of the inputs themselves (texts, conversations, ids), so other inputs are another config."""
    return hashlib.sha256(json.dumps(finite_or_none(list(items)), sort_keys=True).encode()).hexdigest()[:16]


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
                direction = fit.sweep.direction(result.hook)
                path = direction_path(folder, result.hook)
                direction.save(path)
                ctx.directions[str(path)] = direction
        fit.save(folder)
        ctx.directions[str(folder / "probe")] = fit.sweep.direction()
        return folder / "probe"

    title = {"surprise": "Probes: decoding input surprise", "entropy": "Probes: decoding output entropy"}.get(
        target, f"Probes: decoding {target}")
    return Stage(f"fit_{target}", config, run, load=lambda ctx, folder: folder / "probe", needs=("capture",),
                 owned=("sweep.json",),
                 sections=(SectionSpec(f"fit_{target}", title, f"fit_{target}", lambda f: fit_section(f, target),
                                       question="decodable" if target == "surprise" else None),))


# --- steering and the entropy-direction comparison --------------------------------------------------

def _steer_config(settings: dict, inputs: str) -> dict:
    return {**_capture_config(settings, inputs),
            **_keys(settings, "steer_inputs", "strengths", "random_directions", "n_boot", "seed")}


def _run_steer(ctx: StudyContext, folder: Path):
    probe_path = ctx.results["fit_surprise"]
    probe = ctx.direction(probe_path)
    settings = ctx.settings
    result = steering_experiment(
        ctx.model, ctx.items[: settings["steer_inputs"]], probe, settings["strengths"], probe_path=probe_path,
        random_directions=settings["random_directions"], n_boot=settings["n_boot"], seed=settings["seed"],
        progress=ctx.progress, config=_steer_config(settings, ""),
    )
    result.save(folder)
    return result


def _run_compare(ctx: StudyContext, folder: Path):
    surprise = ctx.direction(ctx.results["fit_surprise"])
    entropy_folder = Path(ctx.results["fit_entropy"]).parent
    entropy_best = ctx.direction(ctx.results["fit_entropy"])
    directions = {f"entropy (best hook, {entropy_best.hook})": entropy_best}
    at_surprise_hook = direction_path(entropy_folder, surprise.hook)
    if entropy_best.hook != surprise.hook and at_surprise_hook.with_name(at_surprise_hook.name + ".json").exists():
        directions[f"entropy (surprise hook, {surprise.hook})"] = ctx.direction(at_surprise_hook)
    settings = ctx.settings
    result = entropy_direction_comparison(
        ctx.model, ctx.items[: settings["steer_inputs"]], surprise, directions, settings["compare_strengths"],
        random_directions=settings["random_directions"], n_boot=settings["n_boot"], seed=settings["seed"],
        progress=ctx.progress,
    )
    result.save(folder)
    return folder / "direction_comparison.json"


# Rows x positions per norm-control forward: its logits at the scored positions are rows x scored x
# vocab floats (1.1 GB at 8192 tokens on SmolLM2's 49k vocabulary; the run peaked at 4.2 GB).
NORM_BATCH_TOKENS = 4096


def _norm_config(settings: dict, inputs: str) -> dict:
    return {**_capture_config(settings, inputs),
            **_keys(settings, "norm_inputs", "norm_strengths", "random_directions", "norm_neurons",
                    "norm_random_neurons", "n_boot", "seed")}


def _run_norm(ctx: StudyContext, folder: Path):
    """Surprise or the norm: the surprise direction steered with the norms free and frozen, its
    geometry against W_U's near-null space (beside the entropy probe's at the same hook when fitted)
    and the entropy neurons' mediation (interventions.norm_control)."""
    settings = ctx.settings
    surprise = ctx.direction(ctx.results["fit_surprise"])
    entropy = None  # the entropy probe's direction at the same hook, for the geometry, when it was fitted
    if ctx.results.get("fit_entropy") is not None:
        at_hook = direction_path(Path(ctx.results["fit_entropy"]).parent, surprise.hook)
        entropy = ctx.direction(at_hook) if at_hook.with_name(at_hook.name + ".json").exists() else None
    result = norm_control(
        ctx.model, surprise, ctx.items[: settings["norm_inputs"]], strengths=settings["norm_strengths"],
        n_random=settings["random_directions"], entropy_direction=entropy, n_neurons=settings["norm_neurons"],
        n_random_neurons=settings["norm_random_neurons"], n_boot=settings["n_boot"], seed=settings["seed"],
        progress=ctx.progress, max_batch_tokens=NORM_BATCH_TOKENS,
    )
    result.save(folder)
    return folder / "norm_control.json"


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
    probe = ctx.direction(probe_path)
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
    probe = ctx.direction(probe_path)
    pairs = read_json(Path(ctx.results["patch"]) / "pairs.json")["pairs"]
    hooks = [resid_post(layer) for layer in patch_layers(int(ctx.model.cfg.n_layers), settings["patch_layers"])]
    validate_attribution(ctx.model, [(p["source"], p["destination"]) for p in pairs], direction=probe, hooks=hooks,
                         groups=PATCH_GROUPS, progress=ctx.progress,
                         exact=_patched_moves(Path(ctx.results["patch"]), probe_path, hooks, len(pairs))).save(folder)
    probes = {}
    for hook in resid_post_hooks(ctx.model):
        path = direction_path(probe_path.parent, hook)
        if path.with_name(path.name + ".json").exists():
            probes[hook] = ctx.direction(path)
    strength = max(abs(s) for s in settings["strengths"]) or 1.0
    token_view_data(ctx.model, ctx.items[0], probe, probes=probes, strength=strength,
                    max_tokens=settings["token_view_tokens"],
                    title=f"{ctx.model_name} reading input 0 of {settings.get('input', 'the inputs')}").save(folder)
    return folder


# --- policy gap and cached intention ----------------------------------------------------------------

def _gap_config(settings: dict, inputs: str) -> dict:
    return {"model": settings["model"], "dtype": settings.get("dtype", "float32"), "probe_inputs": inputs,
            **_keys(settings, "gap_prompts", "base_reader", "sample_tokens", "n_boot", "seed", "batch_size"),
            "gap_temperatures": settings.get("gap_temperatures")}


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
        temperatures=settings.get("gap_temperatures") or None,
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
    path = write_study_report(out, sections=report_sections(ctx.stages or None), stages=dict(ctx.status),
                              settings=ctx.settings,
                              total_seconds=time.perf_counter() - ctx.started)
    # index.html only points to the report (a folder listing opens it)
    write_text(out / "index.html",
               "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='0; url=report.html'>"
               "<title>surprise-probe study</title></head><body><a href='report.html'>report.html</a></body></html>\n")
    return path


def default_stages() -> list[Stage]:
    """capture -> fit_surprise, fit_entropy -> steer -> norm -> compare -> patch -> attribution -> gap -> intention
    -> report."""
    return [
        Stage("capture", _capture_config, _run_capture, load=lambda ctx, folder: load_capture(folder),
              owned=("manifest.json", "run.json"),
              sections=(SectionSpec("capture", "Capture: per-token surprise, entropy and activations", "capture",
                                    capture_section),)),
        _fit_stage("surprise"),
        _fit_stage("entropy"),
        Stage("steer", _steer_config, _run_steer, load=lambda ctx, folder: read_json(folder / "steer.json"),
              needs=("fit_surprise",), owned=("steer.json",),
              sections=(SectionSpec("steer", "Steering and ablation along the surprise direction", "steer",
                                    steer_section, question="causal"),)),
        Stage("norm", _norm_config, _run_norm, load=lambda ctx, folder: folder / "norm_control.json",
              needs=("fit_surprise",), owned=("norm_control.json",),
              sections=(SectionSpec("norm", "Surprise or the norm? Steering with the layer norms frozen", "norm",
                                    norm_section, question="direct"),)),
        Stage("compare", lambda s, i: {**_steer_config(s, i), "compare_strengths": s["compare_strengths"],
                                       "directions": "surprise vs entropy"}, _run_compare,
              load=lambda ctx, folder: folder / "direction_comparison.json", needs=("fit_surprise", "fit_entropy"),
              owned=("direction_comparison.json",),
              sections=(SectionSpec("compare", "Surprise direction vs entropy directions", "compare",
                                    compare_section),)),
        Stage("patch", _patch_config, _run_patch, load=lambda ctx, folder: folder, needs=("fit_surprise",),
              owned=("patch.json",),
              sections=(SectionSpec("patch", "Activation patching along the surprise direction", "patch",
                                    patch_section, question="patching"),)),
        Stage("attribution", _attribution_config, _run_attribution, load=lambda ctx, folder: folder,
              needs=("fit_surprise", "patch"), owned=("attribution.json",),
              sections=(SectionSpec("attribution", "Attribution patching, validated against exact patching",
                                    "attribution", attribution_section),
                        SectionSpec("token_view", "Token view: one conversation, token by token", "attribution",
                                    token_view_section, status_of="attribution"))),
        Stage("gap", _gap_config, _run_gap, load=lambda ctx, folder: folder / "gap.json", owned=("gap.json",),
              sections=(SectionSpec("gap", "Policy gap: on-policy vs off-policy entropy", "gap", gap_section,
                                    question="gap"),)),
        Stage("intention", _intention_config, _run_intention, load=lambda ctx, folder: folder / "intention.json",
              owned=("intention.json",),
              sections=(SectionSpec("intention", "Cached intention: has the model chosen its topic before writing?",
                                    "intention", intention_section, question="intention"),)),
        Stage("report", lambda settings, inputs: {}, _run_report, folder=None),
    ]


def report_sections(stages: Sequence[Stage] | None = None) -> list[SectionSpec]:
    """The report sections of ``stages`` (default: :func:`default_stages`), in stage order.

    To rebuild a study's report: ``write_study_report("runs/study", sections=report_sections())``.
    """
    return [section for stage in (stages or default_stages()) for section in stage.sections]


