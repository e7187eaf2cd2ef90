"""Benchmark: wall and CPU seconds of chosen study stages at the default sizes.

    python scripts/bench_stages.py --model /tmp/q_rand_smol --stages patch attribution --out runs/bench/stages
    flock /tmp/sp-model.lock python scripts/bench_stages.py --model smollm2-135m-instruct \\
        --stages patch attribution --out runs/bench/stages_smollm2

Runs the study (``surprise_probe.app.study.run_study``, default sizes; ``--quick`` for the quick ones)
with only the stages the timed ones need (capture and fit_surprise; patch before attribution),
each once, in this process with ``--threads`` torch threads, and prints one line per stage with
its wall and CPU seconds (CPU time of this process: on a shared machine the wall clock also counts
others' work). The prerequisite stages resume from ``<out>/study`` when they are there already, so
a second run with another code version times only the named stages; a named stage whose folder
exists is refused (remove that folder to time it again). Writes ``bench_stages.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

NEEDS = {"patch": ["fit_surprise"], "attribution": ["fit_surprise", "patch"], "steer": ["fit_surprise"],
         "compare": ["fit_surprise", "fit_entropy"], "fit_surprise": [], "fit_entropy": [], "gap": [], "intention": []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--input", default="builtin", help="what `surprise-probe study --input` takes")
    parser.add_argument("--stages", nargs="+", default=["patch", "attribution"], choices=sorted(NEEDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the study's --quick sizes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for name in args.stages:
        if (args.out / "study" / name).exists():
            print(f"bench_stages: {args.out / 'study' / name} exists; remove it to time stage {name!r} again, "
                  "or use another --out", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)

    from surprise_probe.app.study import DEFAULT_SETTINGS, QUICK_SETTINGS, default_stages, run_study
    from surprise_probe.core.models.loading import load_model
    from surprise_probe.core.text.files import read_items
    from surprise_probe.core.utils.jsonio import software_versions, write_json

    settings = {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), "model": args.model, "input": args.input}
    items = read_items(args.input)[: settings["max_inputs"]]
    model = load_model(args.model, progress=False)
    wanted = {"capture", *args.stages, *(need for name in args.stages for need in NEEDS[name])}
    seconds: dict[str, tuple[float, float]] = {}

    def timed(stage):
        def run(ctx, folder):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return stage.run(ctx, folder)
            finally:
                seconds[stage.name] = (time.perf_counter() - wall, time.process_time() - cpu)

        return replace(stage, run=run)

    stages = [timed(stage) for stage in default_stages() if stage.name in wanted]
    result = run_study(model, items, args.out / "study", settings=settings, stages=stages, progress=False)
    print(f"\nmodel {args.model}, inputs {args.input} ({len(items)} items), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    rows = []
    for stage in stages:
        status = result.stages[stage.name]["status"]
        wall, cpu = seconds.get(stage.name, (0.0, 0.0))
        rows.append({"stage": stage.name, "status": status, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     "timed": stage.name in args.stages})
        print(f"{stage.name:>14}: {status:>8}  {wall:7.1f} s wall  {cpu:7.1f} s CPU"
              + ("" if stage.name in args.stages else "  (prerequisite)"))
    write_json(args.out / "bench_stages.json", {
        "config": {k: str(v) for k, v in vars(args).items()}, "settings": settings, "stages": rows,
        "software_versions": software_versions()})
    return 0 if all(row["status"] in ("done", "resumed") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
