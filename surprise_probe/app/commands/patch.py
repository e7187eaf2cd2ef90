"""``surprise-probe patch``: activation patching between paired reads along a probe direction."""

from __future__ import annotations

import contextlib
import re

from surprise_probe.app.commands._common import (
    add_command,
    claim_on_main,
    command_config,
    finished_everywhere,
    input_spec,
    load_model_from_args,
    nonneg_int,
    usage_errors,
)
from surprise_probe.app.commands.steer import add_probe_arguments, check_probe_file
from surprise_probe.core.text.files import read_pairs
from surprise_probe.interventions.experiments import patching_experiment

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "patch", help="activation patching between paired runs along a probe direction",
        description="For each layer x position group, patch the source run's activation (the component along the "
                    "probe direction, and the whole activation) into the destination run and report the fraction "
                    "of the entropy gap closed.",
    )
    add_probe_arguments(parser)
    parser.add_argument("--pairs", required=True, type=input_spec, help='.jsonl of {"source": item, "destination": item}')
    parser.add_argument("--layers", type=nonneg_int, nargs="+", default=None, help="layers to patch (default: all)")
    parser.add_argument("--groups", nargs="+", default=["prompt", "response", "first4"],
                        help="position groups: prompt, response, first<K>")
    parser.add_argument("--components", nargs="+", choices=["direction", "all"], default=["direction", "all"],
                        help="patch the component along the direction, the whole activation, or both")
    parser.add_argument("--random-directions", type=nonneg_int, default=10,
                        help="seeded random unit directions patched like the probe direction, as its control "
                             "(each adds one 'direction' run per layer and group; 0: none)")
    parser.set_defaults(func=run)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            bad = [g for g in args.groups if not re.fullmatch(r"prompt|response|first[1-9][0-9]*", g)]
            if bad:
                raise ValueError(f"--groups {bad[0]!r}: expected 'prompt', 'response' or 'first<K>' with K >= 1")
            probe = check_probe_file(args.probe, args.allow_unverified_probe)
            pairs = read_pairs(args.pairs)
            # Under torchrun the ranks split the inputs; rank 0 alone claims the folder, writes and prints.
            claim = claim_on_main(stack, args, "patch", ("patch.json",))
            main = claim is not None
        if finished_everywhere(claim):
            print(f"{args.out} already holds this patching result (same settings); nothing to do")
            return 0
        model = load_model_from_args(args, progress=not args.no_progress)
        probe.check_model(model)
        print(f"[patch] {len(pairs)} pairs, groups {args.groups}")
        result = patching_experiment(
            model, pairs, probe, probe_path=args.probe, layers=args.layers, groups=args.groups,
            components=args.components, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
            n_boot=args.n_boot, seed=args.seed,
            random_directions=args.random_directions, progress=not args.no_progress, config=command_config(args),
        )
        if not main:
            return 0
        paths = result.save(args.out)
        claim.finish({"probe": result.probe})
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
