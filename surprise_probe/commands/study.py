"""``surprise-probe study``: the main job (capture -> probes -> steering -> report) on one model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from surprise_probe.commands._common import (
    add_command,
    add_model_arguments,
    add_out_argument,
    command_config,
    finite_float,
    load_model_from_args,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.commands.capture import add_input_argument, describe_items
from surprise_probe.io import read_items
from surprise_probe.outputs import check_writable_target, claim_output
from surprise_probe.study import DEFAULT_SETTINGS, check_stages, run_study

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "study",
                         help="the main job: capture -> probes -> steering -> report on one model",
                         description="Capture every layer, fit surprise and entropy probes, steer along the best "
                                     "surprise direction and ablate it, and write index.html. Each stage resumes "
                                     "when its settings match (see study.json for the status of each stage).")
    add_model_arguments(parser)
    add_input_argument(parser)
    add_out_argument(parser, "output folder", required=False, default=Path("runs/study"))
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_SETTINGS["batch_size"],
                        help="sequences per forward pass in the capture")
    parser.add_argument("--steer-inputs", type=positive_int, default=DEFAULT_SETTINGS["steer_inputs"],
                        help="inputs used for the steering sweep (the first N)")
    parser.add_argument("--strengths", type=finite_float, nargs="+", default=DEFAULT_SETTINGS["strengths"],
                        help="steering strengths in units of the probe projection's std")
    parser.add_argument("--random-directions", type=nonneg_int, default=DEFAULT_SETTINGS["random_directions"],
                        help="random control directions for steering and ablation")
    parser.add_argument("--n-boot", type=positive_int, default=DEFAULT_SETTINGS["n_boot"],
                        help="bootstrap resamples of sequences")
    parser.add_argument("--seed", type=nonneg_int, default=DEFAULT_SETTINGS["seed"], help="seed for folds, controls, bootstrap")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    settings = command_config(args)
    with contextlib.ExitStack() as stack:
        with usage_errors():
            if len(set(args.strengths)) < 2:
                raise ValueError(f"--strengths needs at least two distinct values, got {args.strengths}")
            check_writable_target(args.out, is_file=False)
            items = read_items(args.input)
            if args.steer_inputs > len(items):
                raise ValueError(f"--steer-inputs {args.steer_inputs} is more than the {len(items)} inputs in {args.input}")
            print(f"[surprise-probe] {describe_items(args.input, items)}")
            stack.enter_context(claim_output(args.out, "study", settings, overwrite=args.overwrite,
                                             check_config=False, owned_names=("study.json",)))
            if not args.overwrite:
                check_stages(args.out, settings, items)
        model = load_model_from_args(args, progress=not args.no_progress)
        result = run_study(model, items, args.out, settings=settings, overwrite=args.overwrite,
                           progress=not args.no_progress)
    failed = {name: s for name, s in result.stages.items() if s["status"] in ("failed", "skipped")}
    for name, stage in failed.items():
        print(f"stage {name} {stage['status']}: {stage['error']}")
    print(f"\nstudy {'done' if not failed else 'finished with ' + str(len(failed)) + ' stage(s) not done'}; "
          f"open {args.out / 'index.html'} (stage status: {args.out / 'study.json'})")
    if failed:
        first = next(iter(failed.items()))
        raise RuntimeError(f"stage {first[0]} {first[1]['status']}: {first[1]['error']}")
    return 0


