"""Benchmark: loading a model, with and without the processed-weights caches.

    python scripts/bench_load.py --rounds 3                      # the embedded default, float32
    python scripts/bench_load.py --model smollm2-135m-instruct --dtype bfloat16 --rounds 3

Each load runs in a fresh child process (so every load pays what a new ``surprise-probe`` command
pays, and its peak memory is its own), round-robin over the variants so a drifting host slows all
of them alike: the TransformerBridge reading its processed-weights cache
(``core.models.bridge_cache``), the bridge processing its weights on every load
(``bridge_cache.ENABLED = False``), and, where TransformerLens has it (3.x), the HookedTransformer
from its processed-weights cache. One warm-up load per variant first (it also writes the caches).
Per variant: the best and every round's wall seconds of ``load_model`` plus a first forward of 64
tokens (which touches every weight: a cache read as a memory map pays its page reads there), the
load alone, the CPU seconds, the child's peak RSS (with the forward), and the ratio to the bridge
without the cache. Prints a markdown table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time
import surprise_probe as sp
from surprise_probe.core.models import bridge_cache
model, dtype, backend, cache = sys.argv[1:5]
bridge_cache.ENABLED = cache == "1"
wall, cpu = time.perf_counter(), time.process_time()
loaded = sp.load_model(model, device="cpu", dtype=dtype, backend=backend, progress=False)
load_wall, load_cpu = time.perf_counter() - wall, time.process_time() - cpu
import torch
with torch.no_grad():  # the first forward touches every weight (a memory-mapped file's pages load here)
    loaded(torch.arange(64).unsqueeze(0), return_type=None)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"load_wall": load_wall, "load_cpu": load_cpu, "wall": wall, "cpu": cpu,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "class": type(loaded).__name__}))
"""


def variants() -> dict[str, tuple[str, str]]:
    from surprise_probe.core.models.backends import hooked_transformer_available

    found = {"bridge, processed-weights cache": ("bridge", "1"), "bridge, processing every load": ("bridge", "0")}
    if hooked_transformer_available():
        found["HookedTransformer, processed-weights cache"] = ("hooked", "1")
    return found


def run_child(code: str, argv: list[str], threads: int, what: str) -> dict:
    """Run ``code`` in a fresh Python process with ``threads`` threads; the JSON its last line prints."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            env={**os.environ, **env}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_once(model: str, dtype: str, backend: str, cache: str, threads: int) -> dict:
    return run_child(CHILD, [model, dtype, backend, cache], threads, f"load ({backend}, cache={cache})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    runs = {name: [] for name in variants()}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for backend, cache in variants().values():
        load_once(args.model, args.dtype, backend, cache, args.threads)  # warm-up (writes the caches)
    for _ in range(args.rounds):
        for name, (backend, cache) in variants().items():
            runs[name].append(load_once(args.model, args.dtype, backend, cache, args.threads))
    base = min(r["wall"] for r in runs["bridge, processing every load"])
    tl = importlib.metadata.version("transformer-lens")
    print(f"{args.model} {args.dtype}, TransformerLens {tl}, {args.threads} threads, {args.rounds} rounds, "
          f"{platform.machine()}, started {started}")
    print("| load | class | load + first forward, best wall s | every round | load alone, s | CPU s | "
          "peak RSS GB | x bridge processing |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    table = {}
    for name, rows in runs.items():
        best = min(rows, key=lambda r: r["wall"])
        table[name] = {"rounds": rows, "best": best, "ratio": best["wall"] / base}
        every = ", ".join(f"{r['wall']:.2f}" for r in rows)
        print(f"| {name} | {best['class']} | {best['wall']:.2f} | {every} | {best['load_wall']:.2f} "
              f"| {best['cpu']:.2f} | {max(r['peak_rss_gb'] for r in rows):.2f} | {best['wall'] / base:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "dtype": args.dtype, "transformer_lens": tl, "started": started,
                       "threads": args.threads, "variants": table}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
