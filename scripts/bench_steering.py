"""Benchmark: batched steering sweep vs the one-condition loop and vs the compute floor.

    python scripts/bench_steering.py                                  # tiny random model, offline
    python scripts/bench_steering.py --model smollm2-135m-instruct --out runs/bench_steering

In one run: the same dose-response (probe-like direction + orthogonal + k random directions,
every strength, every input) through the one-condition loop (``batched=False``, the reference) and
the batched sweep, which must agree to ``--atol``; and the *floor*: for each input, one clean
forward up to the hook plus, for the N conditions, forwards from the hook to the logits at the
scored positions only (``start_at_layer``, same rows per forward as the sweep, no metrics). The
floor has no key-value cache sharing, so a sweep that shares the prompt can come in under it.
Prints a markdown table; with ``--out`` also writes ``bench_steering.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _model(name: str, device: str):
    if name in ("tiny", "tiny-bridge"):
        from surprise_probe.testing import tiny_bridge, tiny_hooked_transformer

        return tiny_hooked_transformer() if name == "tiny" else tiny_bridge()
    from surprise_probe import load_model

    return load_model(name, device=device)


def _items(model, n: int) -> list:
    from surprise_probe.testing import TINY_CORPUS

    try:
        from surprise_probe.io import builtin_items

        items = [{"messages": item["messages"]} for item in builtin_items() if "messages" in item]
    except (ImportError, FileNotFoundError, ValueError):
        items = []
    if len(items) < n or str(model.cfg.model_name).startswith("tiny"):
        items = [
            [{"role": "user", "content": TINY_CORPUS[i % len(TINY_CORPUS)]},
             {"role": "assistant", "content": TINY_CORPUS[(i + 1) % len(TINY_CORPUS)]}]
            for i in range(n)
        ]
    return items[:n]


def _projection_std(model, encoded, hook: str, direction: torch.Tensor) -> float:
    from surprise_probe.capture import forward
    from surprise_probe.inputs import pad_batch, pad_id

    batch = pad_batch(encoded, pad_id(model))
    with torch.no_grad():
        _, acts = forward(model, batch, [hook])
    return float((acts[hook][batch.scored].float() @ direction).std())


@torch.no_grad()
def _floor(model, encoded, layer: int, n_conditions: int, batch_size: int, max_batch_tokens: int) -> None:
    """The floor's work: per input, the clean forward up to the hook, then ``n_conditions`` rows
    from the hook to the logits at the scored positions (full sequence, no cache, no metrics)."""
    from surprise_probe.capture import unembed

    for item in encoded:
        tokens = torch.as_tensor(item.token_ids, dtype=torch.long).unsqueeze(0)
        at = torch.as_tensor(item.scored, dtype=torch.bool)
        residual = model(tokens, stop_at_layer=layer + 1)
        rows = max(1, min(batch_size, max_batch_tokens // len(item.token_ids)))
        for k in range(0, n_conditions, rows):
            n = min(rows, n_conditions - k)
            final = model(residual.expand(n, -1, -1), start_at_layer=layer + 1, stop_at_layer=int(model.cfg.n_layers))
            unembed(model, final[:, at])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'tiny-bridge', or a name for surprise_probe.load_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-inputs", type=int, default=8)
    parser.add_argument("--strengths", type=float, nargs="+", default=[-8, -4, -2, -1, 0, 1, 2, 4, 8])
    parser.add_argument("--random-directions", type=int, default=8)
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward, every mode")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens per forward, every mode")
    parser.add_argument("--repeats", type=int, default=3, help="best-of timing repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from surprise_probe.interventions import SteeringDirection, dose_response

    from surprise_probe.inputs import encode_all
    from surprise_probe.jsonio import software_versions, write_json

    model = _model(args.model, args.device)
    layer = int(model.cfg.n_layers) // 2 if args.layer is None else args.layer
    hook = f"blocks.{layer}.hook_resid_post"
    encoded = encode_all(model, _items(model, args.n_inputs), truncate=True)
    d = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    direction = SteeringDirection(d, hook, _projection_std(model, encoded, hook, d))
    kwargs = dict(random_directions=args.random_directions, batch_size=args.batch_size,
                  max_batch_tokens=args.max_batch_tokens, progress=False, n_boot=10)
    dose_response(model, encoded[:1], direction, args.strengths[:2], random_directions=0, progress=False)  # warm-up

    timings, results = {}, {}
    n_conditions = (2 + args.random_directions) * len(args.strengths)
    wall = {}
    for mode in ("loop", "batched", "floor"):
        best, best_wall = float("inf"), float("inf")
        for _ in range(args.repeats):
            # CPU time of this process is the measure: on a shared machine the wall clock also
            # counts other processes' work (both are recorded).
            start, start_wall = time.process_time(), time.perf_counter()
            if mode == "floor":
                _floor(model, encoded, layer, n_conditions, args.batch_size, args.max_batch_tokens)
            else:
                results[mode] = dose_response(model, encoded, direction, args.strengths, batched=mode == "batched", **kwargs)
            best = min(best, time.process_time() - start)
            best_wall = min(best_wall, time.perf_counter() - start_wall)
        timings[mode], wall[mode] = best, best_wall
    diff = max(
        float(np.abs(np.asarray(getattr(results["batched"], key)) - np.asarray(getattr(results["loop"], key))).max())
        for key in ("entropy", "kl", "top1_agreement")
    )
    speedup = timings["loop"] / timings["batched"]
    over_floor = timings["batched"] / timings["floor"]
    n_tokens = results["batched"].n_tokens
    print(f"model {model.cfg.model_name}, hook {hook}, {len(encoded)} inputs ({n_tokens} scored tokens), "
          f"{len(results['batched'].labels)} directions x {len(args.strengths)} strengths = {n_conditions} conditions, "
          f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print()
    print(f"| mode | forward passes | CPU seconds (best of {args.repeats}) | wall seconds | x loop speed | "
          "x floor time | max abs diff vs loop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| loop (one condition at a time) | {results['loop'].n_forwards} | {timings['loop']:.2f} | "
          f"{wall['loop']:.2f} | 1.00 | {timings['loop'] / timings['floor']:.2f} | 0 |")
    print(f"| batched sweep | {results['batched'].n_forwards} | {timings['batched']:.2f} | {wall['batched']:.2f} | "
          f"{speedup:.2f} | {over_floor:.2f} | {diff:.2e} |")
    print(f"| floor (clean to hook + N from hook to scored logits) | | {timings['floor']:.2f} | {wall['floor']:.2f} | "
          f"{timings['loop'] / timings['floor']:.2f} | 1.00 | |")
    ok = diff <= args.atol
    print(f"\nsame result within atol {args.atol}: {'yes' if ok else 'NO'}; batched is {speedup:.2f}x faster than "
          f"the loop and {over_floor:.2f}x the floor's time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "bench_steering.json", {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model_id": str(model.cfg.model_name), "hook": hook, "n_tokens": n_tokens,
            "cpu_seconds": timings, "wall_seconds": wall, "forwards": {m: r.n_forwards for m, r in results.items()},
            "speedup": speedup, "batched_over_floor": over_floor, "n_conditions": n_conditions,
            "max_abs_diff": diff, "torch_threads": torch.get_num_threads(), "versions": software_versions(),
        })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
