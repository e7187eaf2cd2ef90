"""``surprise-probe fit``: ridge probes at every captured hook, with controls, from a capture folder."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from surprise_probe.app.commands._common import (
    add_command,
    add_out_argument,
    claim_on_main,
    command_config,
    finished_everywhere,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.core.capture.store import load_capture
from surprise_probe.core.models import distributed
from surprise_probe.core.models.loading import check_model_name
from surprise_probe.probes.fit import fit_probes
from surprise_probe.probes.sources import read_source_labels
from surprise_probe.probes.surprise_targets import parse_target_spec, resolve_target
from surprise_probe.probes.sweep import RESERVED_CONTROLS

__all__ = ["add_parser", "run"]


def _covariate_name(spec: str) -> str:
    parsed = parse_target_spec(spec)
    return parsed.name if parsed is not None else Path(spec).stem


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "fit",
        help="fit linear probes for input surprise / entropy at every captured hook, with controls",
        description=(
            "Ridge probes from one streamed pass over a capture folder: every hook, every alpha, "
            "k-fold CV grouped by sequence, bootstrap CIs over sequences, token-identity and "
            "shuffled-label controls. Writes sweep.csv, sweep.json, sweep.html, heldout.npz and "
            "the best probe direction (probe.*)."
        ),
    )
    parser.add_argument("--activations", required=True, type=Path, help="capture folder (surprise-probe capture --out)")
    parser.add_argument("--target", default="surprise",
                        help="'surprise' (input surprise), 'entropy' (output entropy), 'local:W' (the same model's "
                             "surprise given only the last W tokens), 'model:NAME' (another model's surprise on the "
                             "same text, aligned by characters), or a .npy/.npz file of per-token values keyed by "
                             "(sequence_id, position) (see docs/probes.md); computed targets are saved in OUT/targets/")
    parser.add_argument("--residualize-on", nargs="+", default=[], metavar="SPEC",
                        help="also fit the probe on the target minus what each of these predicts (learned on the "
                             "training folds): 'local:W', 'model:NAME' or a target file, e.g. local:4 model:gemma-3-270m")
    parser.add_argument("--sources", type=Path,
                        help="the .jsonl the capture was made from; its 'source' keys (e.g. own-sample, human) split "
                             "the held-out R^2 and calibration by source")
    parser.add_argument("--span", choices=["scored", "all"], default="scored",
                        help="tokens to fit and score: 'scored' = the scored span at position > 0, the same for "
                             "every target (custom targets' other tokens are left out and counted); 'all' = every "
                             "token the target gives")
    add_out_argument(parser, "output folder")
    parser.add_argument("--hooks", nargs="+", help="hooks to fit (default: every captured hook)")
    parser.add_argument("--alphas", nargs="+", type=float, help="ridge penalties (default: 17 values, 1e-2..1e6)")
    parser.add_argument("--folds", type=positive_int, default=5, help="CV folds, grouped by sequence")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed for folds, shuffles and bootstrap")
    parser.add_argument("--shuffles", type=nonneg_int, default=20, help="shuffled-label controls")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of sequences")
    parser.add_argument("--no-nested", action="store_true", help="choose alpha on the outer folds (faster, optimistic)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the capture's file sizes and hashes against its manifest")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _check_target_models(capture, specs: list[tuple[str, str]]) -> None:
    """A computed target (local:W, model:NAME) loads models: check they exist before any work."""
    for flag, spec in specs:
        parsed = parse_target_spec(spec) if not Path(spec).is_file() else None
        if parsed is None:
            continue
        for name in ([parsed.model] if parsed.kind == "model" else []) + [capture.model_id]:
            try:
                check_model_name(name)
            except ValueError as error:
                whose = "the capture's model" if name == capture.model_id else "the model"
                raise ValueError(f"{flag} {spec}: {whose} {name!r} cannot be loaded here ({error})") from None


def run(args) -> int:
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with usage_errors():
            if args.folds < 2:
                raise ValueError(f"--folds must be >= 2 for cross-validation, got {args.folds}")
            if args.alphas is not None and not all(a > 0 and a < float("inf") for a in args.alphas):
                raise ValueError(f"--alphas must be positive finite ridge penalties, got {args.alphas}")
            for flag, spec in [("--target", args.target)] + [("--residualize-on", s) for s in args.residualize_on]:
                builtin = flag == "--target" and spec in ("surprise", "entropy")
                if not builtin and parse_target_spec(spec) is None and not Path(spec).is_file():
                    named = "'surprise', 'entropy'" if flag == "--target" else "local:W, model:NAME"
                    raise ValueError(f"{flag} {spec!r} is neither {named} nor an existing .npy/.npz file "
                                     "(see --help for local:W and model:NAME)")
            covariate_names = [_covariate_name(spec) for spec in args.residualize_on]
            if len(set(covariate_names)) != len(covariate_names) or set(covariate_names) & set(RESERVED_CONTROLS):
                raise ValueError(f"--residualize-on names must be distinct and not {list(RESERVED_CONTROLS)}, "
                                 f"got {covariate_names}")
            capture = load_capture(args.activations)
            _check_target_models(capture, [("--target", args.target)]
                                 + [("--residualize-on", s) for s in args.residualize_on])
            sources = read_source_labels(args.sources, capture.n_sequences) if args.sources else None
            missing = [hook for hook in args.hooks or [] if hook not in capture.hooks]
            if missing:
                raise ValueError(f"hook {missing[0]!r} was not captured; captured hooks: {capture.hooks}")
            if args.out.resolve() == Path(args.activations).resolve():
                raise ValueError(f"--out {args.out} is the capture folder itself; choose another folder")
            # Under torchrun every rank reads its shards; rank 0 alone claims the folder and writes.
            claim = claim_on_main(stack, args, "fit", ("sweep.json",))
            main = claim is not None
        if finished_everywhere(claim):
            print(f"{args.out} already holds this fit (same settings); nothing to do")
            return 0
        progress = not args.no_progress
        # a computed target is made and saved by rank 0, then read back by the others
        target = distributed.main_first(lambda: resolve_target(capture, args.target, args.out, progress=progress))
        covariates = {name: distributed.main_first(lambda spec=spec: resolve_target(capture, spec, args.out,
                                                                                     progress=progress))
                      for name, spec in zip(covariate_names, args.residualize_on, strict=True)}
        result = fit_probes(
            capture, target, hooks=args.hooks, verify=not args.no_verify, config=command_config(args),
            alphas=args.alphas, n_folds=args.folds, seed=args.seed, n_shuffles=args.shuffles, n_boot=args.n_boot,
            nested=not args.no_nested, covariates=covariates, sources=sources, span=args.span, progress=progress,
        )
        if not main:
            return 0
        paths = result.save(args.out)
        claim.finish({"capture_content_hash": capture.manifest.get("content_hash")})
    print(f"\n{capture}")
    print(result.summary())
    print(f"\nwrote {paths['csv']}, {paths['json']}, {paths['html']}, {paths['probe']} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
