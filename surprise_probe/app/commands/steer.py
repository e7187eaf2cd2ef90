"""``surprise-probe steer``: dose-response of steering along a probe direction, ablation, steered samples."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from surprise_probe.app.commands._common import (
    add_command,
    add_model_arguments,
    add_out_argument,
    claim_on_main,
    command_config,
    finished_everywhere,
    finite_float,
    load_model_from_args,
    nonneg_float,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.app.commands.capture import add_input_argument
from surprise_probe.core.text.files import read_items
from surprise_probe.core.utils.stats import MIN_RANDOM_DIRECTIONS
from surprise_probe.interventions.experiments import probe_artifact, steering_experiment
from surprise_probe.interventions.steering_sweep import MAX_STEER
from surprise_probe.probes import ProbeDirection

__all__ = ["add_parser", "run", "add_probe_arguments", "check_probe_file"]

DEFAULT_STRENGTHS = [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0]


def add_probe_arguments(parser) -> None:
    """Arguments shared by steer and patch."""
    add_model_arguments(parser)
    parser.add_argument("--probe", required=True, type=Path,
                        help="probe direction (the probe.json written by `surprise-probe fit`)")
    add_out_argument(parser, "output folder (JSON + HTML)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward pass (bounds memory)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=8192,
                        help="tokens (rows x positions) per forward pass (bounds memory; a longer input runs alone)")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (over sequences / pairs)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed for control directions, bootstrap, samples")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--allow-unverified-probe", action="store_true",
                        help="use a probe whose JSON has no artifact hash (written before the hash existed, or "
                             "with it removed), so an edited field cannot be detected; recorded as unverified")


def check_probe_file(path: Path, allow_unverified: bool = False) -> ProbeDirection:
    """Read the probe artifact before any model loads (its model is checked after loading)."""
    probe = ProbeDirection.load(path, allow_unverified=allow_unverified)
    if allow_unverified and not probe_artifact(path)["verified"]:
        print(f"warning: {path} has no artifact hash: its fields (std, hook, ...) are used unverified "
              "(--allow-unverified-probe); the result records the probe as unverified", file=sys.stderr)
    return probe


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "steer", help="dose-response of steering along a probe direction, ablation, steered samples",
        description="Sweep the steering strength (in std of the probe projection) along the probe direction and "
                    "random controls; measure entropy, KL from clean and top-1 agreement over the scored span; "
                    "project the direction out; optionally sample steered text.",
    )
    add_probe_arguments(parser)
    add_input_argument(parser)
    parser.add_argument("--strengths", type=finite_float, nargs="+", default=DEFAULT_STRENGTHS,
                        help="steering strengths in std units of the probe projection")
    parser.add_argument("--random-directions", type=nonneg_int, default=MIN_RANDOM_DIRECTIONS,
                        help=f"random control directions (k); fewer than {MIN_RANDOM_DIRECTIONS} make the z untrustworthy")
    parser.add_argument("--positions", choices=["response", "all"], default="response",
                        help="edit the scored span (assistant response) only, or every token")
    parser.add_argument("--hook", default=None, help="hook to steer at (default: the probe's hook)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the directional ablation")
    parser.add_argument("--loop", action="store_true", help="run one strength at a time (reference; slower)")
    parser.add_argument("--samples", type=nonneg_int, default=0,
                        help="sample steered text for the first N inputs at the lowest, zero and highest strength")
    parser.add_argument("--max-new-tokens", type=positive_int, default=40, help="length of each steered sample")
    parser.add_argument("--temperature", type=nonneg_float, default=1.0, help="sampling temperature of the samples")
    parser.add_argument("--truncate", action="store_true", help="cut inputs longer than the model context")
    parser.set_defaults(func=run)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            if len(set(args.strengths)) < 2:
                raise ValueError(f"--strengths needs at least two distinct values, got {args.strengths}")
            probe = check_probe_file(args.probe, args.allow_unverified_probe)
            too_strong = [s for s in args.strengths if abs(s) * probe.std >= MAX_STEER]
            if too_strong:
                raise ValueError(
                    f"--strengths {too_strong[0]:g}: times the probe's std ({probe.std:g}) it overflows the float32 "
                    f"norm of the edited activation, so every direction's output would be uniform; keep "
                    f"|strength| below {MAX_STEER / probe.std:.3g}"
                )
            items = read_items(args.input)
            for note in probe.caveats():  # said before the work, not only in steer.json
                print(f"warning: the steered probe at {note}", file=sys.stderr)
            # Under torchrun the ranks split the inputs; rank 0 alone claims the folder, writes and prints.
            claim = claim_on_main(stack, args, "steer", ("steer.json",))
            main = claim is not None
        if finished_everywhere(claim):
            print(f"{args.out} already holds this steering result (same settings); nothing to do")
            return 0
        model = load_model_from_args(args, progress=not args.no_progress)
        probe.check_model(model)
        print(f"[steer] {len(items)} inputs, hook {args.hook or probe.hook}, strengths {args.strengths}, "
              f"{args.random_directions} random directions")
        result = steering_experiment(
            model, items, probe, args.strengths, probe_path=args.probe, random_directions=args.random_directions,
            positions=args.positions, hook=args.hook, ablation=not args.no_ablation, batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens, batched=not args.loop, truncate=args.truncate, samples=args.samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=args.seed, n_boot=args.n_boot, progress=not args.no_progress,
            config=command_config(args),
        )
        if not main:
            return 0
        paths = result.save(args.out)
        claim.finish({"probe": result.probe})
    print(result.summary())
    for row in result.samples:
        print(f"[input {row['input']}, strength {row['strength']:+g}] {row['text']!r}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
