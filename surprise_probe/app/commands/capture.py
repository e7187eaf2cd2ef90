"""``surprise-probe capture``: record activations, input surprise and output entropy per token."""

from __future__ import annotations

import contextlib
from pathlib import Path

from surprise_probe.app.commands._common import (
    add_command,
    add_model_arguments,
    add_out_argument,
    claim_on_main,
    command_config,
    input_spec,
    load_model_from_args,
    nonneg_int,
    positive_int,
    usage_errors,
)
from surprise_probe.core.capture.run import capture
from surprise_probe.core.capture.summary import summarize_capture
from surprise_probe.core.models.devices import STORAGE_DTYPES
from surprise_probe.core.text.files import read_items

__all__ = ["add_parser", "run", "add_input_argument", "describe_items"]


def add_input_argument(parser) -> None:
    parser.add_argument("--input", default="builtin", type=input_spec,
                        help=".txt (one text per line, or per blank-line block if the file has blank lines), "
                             ".jsonl (text / messages / token_ids per line), or 'builtin' (the built-in conversations)")


def describe_items(spec: str, items: list) -> str:
    """One line saying how an input file was read."""
    if str(spec) == "builtin":
        return f"builtin: {len(items)} conversations"
    path = Path(spec)
    if path.suffix == ".txt":
        blocks = any(not line.strip() for line in path.read_text(encoding="utf-8").strip().splitlines())
        return f"{path}: {len(items)} texts ({'one per blank-line block' if blocks else 'one per line'})"
    return f"{path}: {len(items)} inputs"


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "capture",
                         help="record activations, input surprise and output entropy per token")
    add_model_arguments(parser)
    add_input_argument(parser)
    add_out_argument(parser, "output folder (shards + manifest); a rerun with the same settings resumes")
    parser.add_argument("--layers", nargs="+", type=nonneg_int,
                        help="layer indices (their hook_resid_post; the embedding blocks.0.hook_resid_pre, the token-identity "
                             "control, is always added); default: the embedding and every layer")
    parser.add_argument("--hooks", nargs="+", help="explicit TransformerLens hook names instead of --layers")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    parser.add_argument("--shard-size", type=positive_int, default=64, help="sequences per shard on disk")
    parser.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                        help="dtype the activations are stored in")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="longest sequence allowed (default: the model context); longer is an error unless --truncate")
    parser.add_argument("--truncate", action="store_true", help="cut sequences longer than --max-tokens (reported)")
    parser.add_argument("--score-prompt", action="store_true",
                        help="score every token of conversations, not just the assistant's")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of sequences for the CIs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        with usage_errors():
            if args.layers is not None and args.hooks is not None:
                raise ValueError("give --layers or --hooks, not both")
            items = read_items(args.input)
            # Under torchrun every rank captures its shards; rank 0 alone claims the folder,
            # writes the summary and prints.
            claim = claim_on_main(stack, args, "capture", ("run.json",))
            main = claim is not None
            if main:
                print(f"[surprise-probe] {describe_items(args.input, items)}")
        model = load_model_from_args(args, progress=not args.no_progress)
        run_ = capture(
            model, items, hooks=args.hooks, layers=args.layers, out_dir=args.out, batch_size=args.batch_size,
            storage_dtype=args.storage_dtype, max_tokens=args.max_tokens, truncate=args.truncate,
            score_prompt=args.score_prompt, shard_size=args.shard_size, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        if not main:
            return 0
        summary = summarize_capture(run_, n_boot=args.n_boot, config=command_config(args))
        summary.save(args.out)
        claim.finish()
    print(f"\n{run_}")
    print(f"scored span: {'all tokens' if args.score_prompt else 'assistant content (conversations) / all tokens (texts)'}")
    print(f"mean input surprise (nats): {summary.input_surprise['mean']:.4f} "
          f"[{summary.input_surprise['low']:.4f}, {summary.input_surprise['high']:.4f}]")
    print(f"mean output entropy (nats): {summary.output_entropy['mean']:.4f} "
          f"[{summary.output_entropy['low']:.4f}, {summary.output_entropy['high']:.4f}] "
          f"({summary.n_sequences} sequences, {summary.n_scored_tokens} scored tokens)")
    print("\n" + summary.table())
    print(f"\nwrote {args.out} (load with surprise_probe.load_capture({str(args.out)!r}))")
    return 0
