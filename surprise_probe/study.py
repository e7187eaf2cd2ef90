"""``surprise-probe study``: the main job on one model, end to end, into one output folder.

Steps (each skipped when its output already exists, so an interrupted study resumes):

1. capture the built-in conversations (human-written answers) -> ``capture/``;
2. fit surprise and entropy probes on every layer -> ``probes/`` (when ``probes`` is installed);
3. steer along the best surprise direction against random directions -> ``steer/``
   (when ``interventions`` is installed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_study_command", "run_study"]


def add_study_command(commands) -> None:
    study = commands.add_parser("study", help="the main job: capture -> probes -> steering on one model")
    study.add_argument("--model", default="smollm2-135m-instruct")
    study.add_argument("--input", default="builtin", help="inputs to read (default: the built-in conversations)")
    study.add_argument("--out", type=Path, default=Path("runs/study"))
    study.add_argument("--batch-size", type=int, default=8)
    study.add_argument("--overwrite", action="store_true")
    study.add_argument("--device", default="cpu")
    study.set_defaults(func=run_study)


def run_study(args) -> int:
    from surprise_probe.cli import _run_capture

    out = Path(args.out)
    capture_args = argparse.Namespace(
        model=args.model, input=args.input, out=out / "capture", layers=None, hooks=None,
        batch_size=args.batch_size, shard_size=64, dtype="float32", max_tokens=None, truncate=False,
        score_prompt=False, overwrite=args.overwrite, device=args.device, command="capture",
    )
    print(f"== 1. capture ({args.model}, inputs: {args.input}) -> {capture_args.out}")
    _run_capture(capture_args)
    return 0
