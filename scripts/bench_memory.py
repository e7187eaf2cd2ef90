"""Benchmark: peak resident memory of the Quickstart study, per stage.

    python scripts/bench_memory.py --out runs/bench/memory                 # the embedded default
    python scripts/bench_memory.py --model smollm2-135m-instruct --dtype bfloat16 --out runs/bench/memory_bf16

Runs the same stages as ``surprise-probe study`` at its default settings (model load, then every
stage of ``study.default_stages()``; ``--quick`` for the quick sizes) in this process, through the library (``surprise_probe.app.study``),
while a thread samples the process's resident set size (RSS) every ``--interval`` seconds. For
each stage it reports the peak RSS while the stage ran, the RSS when it started, and its wall and
CPU seconds (CPU time of this process: on a shared machine the wall clock also counts others'
work), plus the peak of the whole run. The gap stage's base reader is off unless
``--base-reader`` names one (the CLI's ``auto`` picks gemma-3-270m when installed; measure it
separately, it is a second model in memory). Prints a markdown table; writes ``bench_memory.json`` (and the study's
own outputs under ``<out>/study``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch


class RssSampler:
    """Samples this process's RSS in a thread; ``stage`` labels the samples."""

    def __init__(self, interval: float):
        self.interval, self.stage = interval, "start"
        self.peaks: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._began, self._began_cpu = time.perf_counter(), time.process_time()
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def enter(self, stage: str) -> None:
        self._sample()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - self._began
        self.cpu_seconds[self.stage] = self.cpu_seconds.get(self.stage, 0.0) + time.process_time() - self._began_cpu
        self._began, self._began_cpu = time.perf_counter(), time.process_time()
        self.stage = stage
        self.starts[stage] = self._process.memory_info().rss
        self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.enter("end")
        self._stop.set()
        self._thread.join()


def _wrap(stage, sampler: RssSampler):
    run = stage.run

    def measured(ctx, folder):
        sampler.enter(stage.name)
        try:
            return run(ctx, folder)
        finally:
            sampler.enter("between stages")

    return replace(stage, run=measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--input", default="builtin", help="what `surprise-probe study --input` takes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--base-reader", default=None,
                        help="a second (base) model for the gap stage, as `study --base-reader` (default: none)")
    parser.add_argument("--quick", action="store_true", help="the study's --quick sizes")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between RSS samples")
    parser.add_argument("--target-gb", type=float, default=3.0, help="the peak the run must stay under")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from surprise_probe.app.study import DEFAULT_SETTINGS, QUICK_SETTINGS, default_stages, run_study
    from surprise_probe.core.models.loading import load_model
    from surprise_probe.core.text.files import read_items
    from surprise_probe.core.utils.jsonio import software_versions, write_json

    settings = {**(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS), "model": args.model, "input": args.input,
                "dtype": args.dtype, "device": args.device, "base_reader": args.base_reader}
    items = read_items(args.input)[: settings.get("max_inputs")]
    started = time.perf_counter()
    with RssSampler(args.interval) as sampler:
        sampler.enter("load model")
        model = load_model(args.model, device=args.device, dtype=args.dtype, progress=False)
        stages = [_wrap(stage, sampler) for stage in default_stages()]
        result = run_study(model, items, args.out / "study", settings=settings, stages=stages,
                           overwrite=True, progress=False)
    elapsed = time.perf_counter() - started

    gb = 1024**3
    order = ["start", "load model", *[s.name for s in stages]]
    rows = [
        {"stage": name, "seconds": round(sampler.seconds.get(name, 0.0), 1),
         "cpu_seconds": round(sampler.cpu_seconds.get(name, 0.0), 1),
         "rss_at_start_gb": round(sampler.starts.get(name, 0) / gb, 2), "peak_rss_gb": round(sampler.peaks[name] / gb, 2)}
        for name in order if name in sampler.peaks
    ]
    peak = max(sampler.peaks.values()) / gb
    print(f"model {args.model} ({args.dtype}, {args.device}), inputs {args.input} ({len(items)} items), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{psutil.virtual_memory().total / gb:.0f} GiB RAM; RSS sampled every {args.interval * 1000:.0f} ms\n")
    print("| stage | wall seconds | CPU seconds | RSS at start (GB) | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']} | {row['cpu_seconds']} | {row['rss_at_start_gb']} | "
              f"{row['peak_rss_gb']} |")
    ok = result.ok and peak <= args.target_gb
    status = {name: s["status"] for name, s in result.stages.items()}
    print(f"\npeak resident memory of the whole study: {peak:.2f} GB (target <= {args.target_gb} GB: "
          f"{'met' if peak <= args.target_gb else 'NOT met'}); stages: {status}; {elapsed:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_memory.json", {
        "config": {k: str(v) for k, v in vars(args).items()}, "settings": settings, "stages": rows,
        "peak_rss_gb": round(peak, 3), "stage_status": status, "seconds": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(), "versions": software_versions(),
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
