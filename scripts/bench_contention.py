"""Speed on a shared machine: the toolkit's main work alone and beside a competing CPU load.

Each measured run is a child process with one thread/wait setting; it loads the embedded model,
warms up, then times one workload (wall seconds and CPU seconds of the whole process, every thread
included). Each runs alone, beside a PyTorch job doing matrix products on every core (default
torch settings), and beside a second toolkit run of the same workload and setting. Ratios are
within this one run (the machine's absolute speed varies).

Settings:
  spin-300k    libgomp's default spin (~300k iterations) on every available CPU: the toolkit before 2026-12
  passive      nothing set: the toolkit's default (OMP_WAIT_POLICY=PASSIVE from ``import surprise_probe``,
               as many threads as CPUs available; surprise_probe.core.utils.threads)
  follow-load  SURPRISE_PROBE_THREADS=idle: passive, and as many threads as CPUs are idle when it starts
               (tried on 2026-12-07 and not made the default: docs/benchmarks.md)
  spin-10k     GOMP_SPINCOUNT=10000 on every available CPU: a short spin, then sleep (not run by default)
  one-thread   torch.set_num_threads(1) (cannot spin-wait for another thread)

Workloads (SmolLM2-135M-Instruct, float32): forward (3 forwards of 8 x 128 tokens), capture
(sp.capture of 32 paragraphs, every 3rd layer, in memory), steer (dose-response, 4 inputs x 5
strengths x 3 directions), sample (8 responses x 32 new tokens, batched, KV cache).

    .venv/bin/python scripts/bench_contention.py                       # everything (~10-15 min on 2 cores)
    .venv/bin/python scripts/bench_contention.py --workloads forward capture --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# The child's thread settings come through its environment, read when torch loads: importing the
# toolkit (and torch) here is fine, the parent runs no work of its own.
import torch
from surprise_probe.interventions import SteeringDirection, dose_response, random_directions

import surprise_probe as sp
from surprise_probe.core.forward.sampling import chat_prompt_ids, sample
from surprise_probe.core.text.files import builtin_items
from surprise_probe.core.utils.threads import available_cpus, configure_threads

ALL = str(available_cpus())
SETTINGS = {
    "spin-300k": {"GOMP_SPINCOUNT": "300000", "SURPRISE_PROBE_THREADS": ALL},
    "passive": {},
    "follow-load": {"SURPRISE_PROBE_THREADS": "idle"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000", "SURPRISE_PROBE_THREADS": ALL},
    "one-thread": {"GOMP_SPINCOUNT": "300000", "SURPRISE_PROBE_THREADS": "1"},
}
DEFAULT_SETTINGS = ("spin-300k", "passive", "follow-load", "one-thread")
WORKLOADS = ("forward", "capture", "steer", "sample")
CONDITIONS = ("alone", "beside-matmul", "beside-toolkit")
ROOT = Path(__file__).resolve().parents[1]


def _workload(name: str):
    """Load the model, warm up, and return the callable to time."""
    configure_threads()
    model = sp.load_model("smollm2-135m-instruct", device="cpu", progress=False)
    items = builtin_items()[:32]
    if name == "forward":
        tokens = torch.randint(0, int(model.cfg.d_vocab), (8, 128), generator=torch.Generator().manual_seed(0))

        def run():
            with torch.no_grad():
                for _ in range(3):
                    model(tokens, return_type="logits")
    elif name == "capture":
        layers = list(range(0, int(model.cfg.n_layers), 3))

        def run():
            sp.capture(model, items, layers=layers, progress=False)
    elif name == "steer":
        hook = f"blocks.{int(model.cfg.n_layers) // 2}.hook_resid_post"
        direction = SteeringDirection(torch.as_tensor(random_directions(int(model.cfg.d_model), 1, seed=0)[0]),
                                      hook, 1.0)
        encoded = sp.encode(model, items[0]), sp.encode(model, items[1]), sp.encode(model, items[2]), \
            sp.encode(model, items[3])

        def run():
            dose_response(model, list(encoded), direction, [-4.0, -2.0, 0.0, 2.0, 4.0], random_directions=1,
                          n_boot=50, progress=False)
    elif name == "sample":
        prompts = [chat_prompt_ids(model, text) for text in
                   ("Tell me about the sea.", "What is a good breakfast?", "Why is the sky blue?", "Name a bird.")]

        def run():  # 8 responses of 32 tokens, batched with the key-value cache (the policy gap's sampler)
            sample(model, prompts, n_samples=2, max_new_tokens=32, temperature=1.0, seed=0, stop_ids=set())
    else:
        raise ValueError(f"unknown workload {name!r}")
    # warm-up: one-off costs (first-call allocations, the thread pool) are not what is measured
    with torch.no_grad():
        model(torch.zeros(8, 32, dtype=torch.long), return_type="logits")
    return run


def child(name: str, loop: bool) -> None:
    run = _workload(name)
    threads = torch.get_num_threads()
    if loop:  # a competitor: repeat until killed
        while True:
            run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started, cpu0 = time.perf_counter(), usage.ru_utime + usage.ru_stime
    run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime - cpu0,
                      "threads": threads}))


MATMUL = """
import torch
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).tanh_()
"""


def _env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                              "SURPRISE_PROBE_THREADS")}
    env.update(SETTINGS[setting])
    return env


def measure(workload: str, setting: str, condition: str) -> dict:
    competitors = []
    try:
        if condition == "beside-matmul":
            competitors.append(subprocess.Popen([sys.executable, "-c", MATMUL], env=_env("spin-300k")))
        elif condition == "beside-toolkit":
            competitors.append(subprocess.Popen([sys.executable, __file__, "--child", workload, "--loop"],
                                                env=_env(setting), stdout=subprocess.DEVNULL))
        if competitors:
            time.sleep(8.0 if condition == "beside-toolkit" else 1.0)  # the competitor is busy by now
        out = subprocess.run([sys.executable, __file__, "--child", workload], env=_env(setting), check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for process in competitors:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.loop)
        return 0
    results = []
    for workload in args.workloads:
        for condition in args.conditions:
            for setting in args.settings:
                row = {"workload": workload, "condition": condition, "setting": setting,
                       **measure(workload, setting, condition)}
                results.append(row)
                print(f"{workload:8s} {condition:15s} {setting:11s} wall {row['wall']:7.2f} s  cpu {row['cpu']:7.2f} s"
                      f"  threads {row['threads']}", flush=True)
    print("\nratios to one-thread in the same condition (wall, cpu); alone, to spin-300k and passive (wall):")
    for workload in args.workloads:
        alone = {r["setting"]: r for r in results if r["workload"] == workload and r["condition"] == "alone"}
        for condition in args.conditions:
            rows = {r["setting"]: r for r in results if r["workload"] == workload and r["condition"] == condition}
            one = rows.get("one-thread")
            for setting, row in rows.items():
                parts = [f"{workload:8s} {condition:15s} {setting:11s}"]
                if one:
                    parts.append(f"vs one-thread wall {row['wall'] / one['wall']:.2f}x cpu {row['cpu'] / one['cpu']:.2f}x")
                for before in ("spin-300k", "passive"):
                    if condition == "alone" and before in alone:
                        parts.append(f"vs {before} alone wall {row['wall'] / alone[before]['wall']:.2f}x")
                print("  ".join(parts))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
