"""Benchmark: activation patching from the patched block on vs full forwards, per backend.

    python scripts/bench_patching.py --rounds 2                       # the embedded default
    python scripts/bench_patching.py --model smollm2-135m-instruct --pairs 6 --rounds 2 --threads 2

The study's patch stage at its default sizes on one set of on/off-policy pairs (the model samples
them once, ``build_policy_pairs``): hooks after ``--layers`` evenly spaced blocks (the last
included), the groups of the study, a random unit direction plus ``--random-directions`` controls.
Variants, round-robin over ``--rounds`` so a drifting host slows all alike: each backend this
TransformerLens has (HookedTransformer on 3.x; the TransformerBridge on both) with patched runs
starting after the patched block (``patched_runs.START_AFTER_PATCH``; the bridge through
``interventions.suffix.bridge_from_layer``) and with every patched row a full forward. Per
variant: the best CPU seconds of this process, every round's, and the largest difference of the
patched entropies from the same backend's full forwards. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import numpy as np
import torch
from surprise_probe.interventions import SteeringDirection, activation_patching
from surprise_probe.interventions import patched_runs as patching_module

from surprise_probe.app.study.settings import PATCH_GROUPS, patch_layers
from surprise_probe.app.study.stages import build_policy_pairs
from surprise_probe.core.forward.directions import random_directions
from surprise_probe.core.forward.hooks import resid_post
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.core.models.loading import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=6, help="the study's default: 6")
    parser.add_argument("--tokens", type=int, default=48, help="longest sampled answer (the study's default: 48)")
    parser.add_argument("--layers", type=int, default=8, help="patched layers (the study's default: 8)")
    parser.add_argument("--random-directions", type=int, default=2, help="the study's default: 2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.pairs, args.rounds, args.layers, args.threads) < 1 or args.pairs < 2:
        parser.error("--pairs must be >= 2 and --rounds, --layers, --threads >= 1")
    torch.set_num_threads(args.threads)
    backends = ["hooked", "bridge"] if hooked_transformer_available() else ["bridge"]
    models = {b: load_model(args.model, device="cpu", backend=b, progress=False) for b in backends}
    first = models[backends[0]]
    pairs = build_policy_pairs(first, args.pairs, max_new_tokens=args.tokens, seed=0, progress=False)
    pairs = [(p["source"], p["destination"]) for p in pairs]
    n_layers, d_model = int(first.cfg.n_layers), int(first.cfg.d_model)
    hooks = [resid_post(layer) for layer in patch_layers(n_layers, args.layers)]
    direction = SteeringDirection(random_directions(d_model, 1, seed=7)[0], hooks[len(hooks) // 2], 1.0)
    kwargs = dict(hooks=hooks, groups=PATCH_GROUPS, direction=direction, random_directions=args.random_directions,
                  n_boot=10, progress=False)
    variants = [(b, start) for b in backends for start in (True, False)]
    seconds = {v: [] for v in variants}
    results = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for _ in range(args.rounds):
        for backend, start in variants:
            patching_module.START_AFTER_PATCH = start
            begin = time.process_time()
            results[backend, start] = activation_patching(models[backend], pairs, **kwargs)
            seconds[backend, start].append(time.process_time() - begin)
    patching_module.START_AFTER_PATCH = True
    tl = importlib.metadata.version("transformer-lens")
    print(f"{args.model}, TransformerLens {tl}, {args.pairs} pairs (answers up to {args.tokens} tokens), "
          f"{len(hooks)} hooks x {len(PATCH_GROUPS)} groups x {2 + args.random_directions} components, "
          f"{args.threads} threads, {args.rounds} rounds, started {started}")
    print("| backend | patched runs | CPU s (best) | every round | x full forwards | max abs diff of patched "
          "entropy vs full forwards |")
    print("|---|---|---:|---|---:|---:|")
    for backend, start in variants:
        best, full = min(seconds[backend, start]), min(seconds[backend, False])
        ours, theirs = results[backend, start].entropy_patched, results[backend, False].entropy_patched
        diff = max(float(np.abs(np.asarray(ours[c]) - np.asarray(theirs[c])).max()) for c in theirs)
        every = ", ".join(f"{s:.1f}" for s in seconds[backend, start])
        label = "from the patched block on" if start else "full forwards"
        print(f"| {backend} | {label} | {best:.1f} | {every} | {best / full:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
