"""``surprise-probe generate``: sample responses to prompts, keeping the sampled token ids."""

from __future__ import annotations

import contextlib
import sys

from surprise_probe.app.commands._common import (
    add_command,
    add_model_arguments,
    add_out_argument,
    command_config,
    input_spec,
    load_model_from_args,
    nonneg_float,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.core.forward.responses import generate_to_jsonl, read_responses
from surprise_probe.core.text.files import read_prompts
from surprise_probe.core.utils.outputs import claim_output

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "generate",
                         help="sample responses (keeping the sampled token ids) to prompts")
    add_model_arguments(parser)
    parser.add_argument("--prompts", default="builtin", type=input_spec, help="'builtin' or a .jsonl of {id, prompt, ...} objects")
    add_out_argument(parser, "output .jsonl (a rerun with the same settings resumes)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest response, in tokens")
    parser.add_argument("--temperature", type=nonneg_float, default=0.7, help="sampling temperature (0: greedy)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts sampled together")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            if args.out.suffix != ".jsonl":
                raise ValueError(f"--out {args.out} must end in .jsonl")
            prompts = read_prompts(args.prompts)
            prompts = prompts[: args.limit] if args.limit else prompts
            claim = stack.enter_context(claim_output(args.out, "generate", command_config(args),
                                                     overwrite=args.overwrite, is_file=True))
        if claim.finished and _intact(args.out, prompts):
            print(f"{args.out} already holds these {len(prompts)} responses (same settings); nothing to do")
            return 0
        model = load_model_from_args(args, progress=not args.no_progress)
        path = generate_to_jsonl(
            model, prompts, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            batch_size=args.batch_size, seed=args.seed, record_config=command_config(args),
            progress=not args.no_progress, on_damaged_line=lambda note: print(f"warning: {note}", file=sys.stderr),
        )
        n_responses = len(read_responses(path, [p["id"] for p in prompts])[0])
        claim.finish({"n_responses": n_responses})
    print(f"wrote {path} ({n_responses} responses; read them with --input {path})")
    return 0


def _intact(path, prompts: list[dict]) -> bool:
    """Whether a finished output file still holds one whole record per prompt (no line damaged since)."""
    if not path.exists():
        return False
    records, damaged = read_responses(path, [p["id"] for p in prompts])
    return not damaged and len(records) == len(prompts)
