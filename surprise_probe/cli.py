"""``surprise-probe <command>``: every command writes its outputs plus a JSON of config and results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from surprise_probe.interventions.cli import add_patch_command, add_steer_command
from surprise_probe.probes.cli import add_fit_command
from surprise_probe.study import add_study_command

__all__ = ["main", "build_parser"]

STORAGE_DTYPES = ("float16", "float32")


def _print_models(args) -> int:
    from surprise_probe.models import available_models

    rows = available_models()
    print(f"{'name':<24} {'kind':<13} {'installed':<10} {'cached':<7} description")
    for row in rows:
        print(
            f"{row['name']:<24} {row['kind']:<13} {str(row['installed']):<10} {str(row['cached']):<7} {row['description']}"
        )
    print(
        "\nAlso accepted: a local Hugging Face folder, or a Hugging Face / TransformerLens name already in "
        "the local hub cache (no downloads at run time).\nCache folder: "
        + str(Path(rows[0]["cache_folder"]).parent)
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _load_items(spec: str):
    from surprise_probe.io import builtin_items, read_inputs

    if spec == "builtin":
        return builtin_items()
    path = Path(spec)
    items = read_inputs(path)
    if path.suffix == ".txt":
        blocks = any(not line.strip() for line in path.read_text().strip().splitlines())
        print(f"[surprise-probe] {path}: {len(items)} texts ({'one per blank-line block' if blocks else 'one per line'})")
    return items


def layer_summary(run) -> list[dict]:
    """Per hook: mean residual norm over scored tokens, and its correlation with surprise/entropy.

    A first look only; the probes (``surprise-probe fit``) are the real measurement.
    """
    surprise = run.column("input_surprise", scored_only=True)
    entropy = run.column("output_entropy", scored_only=True)
    finite = np.isfinite(surprise)
    rows = []
    from surprise_probe.store import hook_depth

    for hook in run.hooks:
        norms = np.linalg.norm(run.activations(hook, scored_only=True).astype(np.float64), axis=1)
        rows.append(
            {
                "hook": hook,
                "depth": hook_depth(hook),
                "mean_norm": float(norms.mean()),
                "corr_norm_surprise": float(np.corrcoef(norms[finite], surprise[finite])[0, 1]),
                "corr_norm_entropy": float(np.corrcoef(norms, entropy)[0, 1]),
            }
        )
    return rows


def _run_capture(args) -> int:
    import torch

    from surprise_probe.capture import capture
    from surprise_probe.jsonio import write_json
    from surprise_probe.metrics import bootstrap_mean
    from surprise_probe.models import load_model

    started = time.perf_counter()
    items = _load_items(args.input)
    model = load_model(args.model, device=args.device)
    layers = None if args.layers is None else [int(x) for x in args.layers]
    run = capture(
        model,
        items,
        hooks=args.hooks,
        layers=layers,
        out_dir=args.out,
        batch_size=args.batch_size,
        dtype=getattr(torch, args.dtype),
        max_tokens=args.max_tokens,
        truncate=args.truncate,
        score_prompt=args.score_prompt,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
    surprise = bootstrap_mean(run.column("input_surprise", True), run.column("sequence_ids", True))
    entropy = bootstrap_mean(run.column("output_entropy", True), run.column("sequence_ids", True))
    print(f"\n{run}")
    print(f"scored span: {'all tokens' if args.score_prompt else 'assistant content (conversations) / all tokens (texts)'}")
    print(f"mean input surprise (nats): {surprise}")
    print(f"mean output entropy (nats): {entropy}")
    rows = layer_summary(run)
    print(f"\n{'hook':<28} {'depth':>5} {'|resid|':>9} {'r(|resid|, s)':>14} {'r(|resid|, H)':>14}")
    for row in rows:
        print(
            f"{row['hook']:<28} {row['depth']:>5} {row['mean_norm']:>9.2f} "
            f"{row['corr_norm_surprise']:>14.3f} {row['corr_norm_entropy']:>14.3f}"
        )
    write_json(
        Path(args.out) / "capture_summary.json",
        {
            "config": {k: v for k, v in vars(args).items() if k != "func"},
            "model_id": run.model_id,
            "n_sequences": run.n_sequences,
            "n_tokens": run.n_tokens,
            "n_scored_tokens": int(run.manifest["n_scored_tokens"]),
            "input_surprise": surprise.__dict__,
            "output_entropy": entropy.__dict__,
            "layers": rows,
            "elapsed_seconds": round(time.perf_counter() - started, 2),
        },
    )
    print(f"\nwrote {args.out} (load with surprise_probe.load_capture({str(args.out)!r}))")
    return 0


def _run_generate(args) -> int:
    from surprise_probe.generate import generate_to_jsonl
    from surprise_probe.io import builtin_prompts
    from surprise_probe.models import load_model

    if args.prompts == "builtin":
        prompts = builtin_prompts()
    else:
        prompts = []
        for number, line in enumerate(Path(args.prompts).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{args.prompts}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not {"id", "prompt"} <= set(record):
                raise ValueError(f"{args.prompts}:{number}: expected an object with 'id' and 'prompt'")
            prompts.append(record)
    prompts = prompts[: args.limit] if args.limit else prompts
    model = load_model(args.model, device=args.device)
    path = generate_to_jsonl(
        model, prompts, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        batch_size=args.batch_size, seed=args.seed,
    )
    print(f"wrote {path} ({len(prompts)} responses; read them with --input {path})")
    return 0


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder or cached hub name")
    parser.add_argument("--input", default="builtin",
                        help=".txt (one text per line, or per blank-line block if the file has blank lines), "
                             ".jsonl (text / messages / token_ids per line), or 'builtin'")
    parser.add_argument("--out", required=True, type=Path, help="output folder (shards + manifest)")
    parser.add_argument("--layers", nargs="+", help="layer indices (hook_resid_post); default: embedding + every layer")
    parser.add_argument("--hooks", nargs="+", help="explicit TransformerLens hook names instead of --layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64, help="sequences per shard on disk")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="activation storage dtype")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="longest sequence allowed (default: the model context); longer is an error unless --truncate")
    parser.add_argument("--truncate", action="store_true", help="cut sequences longer than --max-tokens (reported)")
    parser.add_argument("--score-prompt", action="store_true", help="score every token of conversations, not just the assistant's")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder holding a different run")
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surprise-probe",
        description="Input surprise and output entropy in TransformerLens models: capture, probes, interventions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list the models that can be loaded offline, and what is cached")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_print_models)

    capture = commands.add_parser("capture", help="record activations, input surprise and output entropy per token")
    add_capture_arguments(capture)
    capture.set_defaults(func=_run_capture)

    generate = commands.add_parser("generate", help="sample responses (keeping the sampled token ids) to prompts")
    generate.add_argument("--model", default="smollm2-135m-instruct")
    generate.add_argument("--prompts", default="builtin",
                          help="'builtin' or a .jsonl of {id, prompt, ...} objects")
    generate.add_argument("--out", required=True, type=Path, help="output .jsonl (appended; a rerun resumes)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--batch-size", type=int, default=16)
    generate.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(func=_run_generate)

    add_study_command(commands)
    add_fit_command(commands)
    add_steer_command(commands)
    add_patch_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError, ModuleNotFoundError) as error:
        print(f"surprise-probe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
