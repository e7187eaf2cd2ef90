"""Benchmark: single-run attribution (``direction_attribution``) by forward mode and by backward passes.

    python scripts/bench_attribution.py --rounds 2                  # the embedded default, float32
    python scripts/bench_attribution.py --model tiny --rounds 1     # smoke run, no download

``direction_attribution`` (``interventions.attribution``) attributes every token's output entropy
to one direction at every ``blocks.L.hook_resid_post``. With those hooks it runs one forward-mode
pass per hook from the block after it (a HookedTransformer with ``start_at_layer``, a
TransformerBridge with ``interventions.suffix.bridge_from_layer``); otherwise it replicates the
sequence, one row per target token, and back-propagates each row's entropy (one forward and one
backward pass per chunk of rows). This script times both on each backend TransformerLens has,
each run in a fresh child process (its peak memory is its own), round-robin over the variants so
a drifting host slows all of them alike: the attribution of every position of the first built-in
conversation (cut to ``--max-tokens``) to a seeded random unit direction, every layer's
``hook_resid_post``. Per variant: best and every round's wall and CPU seconds of the attribution
alone (after a warm-up call on 8 tokens), the child's peak RSS, the ratio to the HookedTransformer
forward mode (the bridge's forward mode on TransformerLens 4.x), and the largest difference from
that variant's numbers (with ``--model tiny``, whose random models differ by backend, from the
same backend's forward mode). Prints a markdown table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import dataclasses, json, resource, sys, time
import numpy as np, torch
import surprise_probe as sp
from surprise_probe.interventions import attribution
from surprise_probe.core.forward.hooks import resid_post_hooks
from surprise_probe.core.text.encoding import encode
from surprise_probe.core.text.files import read_items
model_name, backend, mode, max_tokens, out = sys.argv[1:6]
torch.set_grad_enabled(False)
if model_name == "tiny":
    from surprise_probe.testing import tiny_bridge, tiny_model
    model = tiny_bridge(n_layers=4, n_ctx=256) if backend == "bridge" else tiny_model()
else:
    model = sp.load_model(model_name, device="cpu", backend=backend, progress=False)
if mode == "backward":
    def unsupported(*args, **kwargs):
        raise NotImplementedError("the benchmark's backward variant")
    attribution._forward_mode_attribution = unsupported
encoded = encode(model, read_items("builtin")[0], truncate=True)
encoded = dataclasses.replace(encoded, token_ids=encoded.token_ids[: int(max_tokens)],
                              scored=encoded.scored[: int(max_tokens)])
d = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
hooks = resid_post_hooks(model)
attribution.direction_attribution(model, encoded, d, hooks=hooks, targets=range(8))  # warm-up
wall, cpu = time.perf_counter(), time.process_time()
values = attribution.direction_attribution(model, encoded, d, hooks=hooks)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
np.save(out, values)
print(json.dumps({"wall": wall, "cpu": cpu, "tokens": len(encoded), "hooks": len(hooks),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "class": type(model).__name__}))
"""


def variants() -> dict[str, tuple[str, str]]:
    """``{name: (backend, mode)}``: forward mode and backward passes on each backend there is."""
    from surprise_probe.core.models.backends import hooked_transformer_available

    found = {}
    if hooked_transformer_available():
        found["HookedTransformer, forward mode"] = ("hooked", "forward")
    found["bridge, forward mode"] = ("bridge", "forward")
    found["bridge, backward passes"] = ("bridge", "backward")
    if hooked_transformer_available():
        found["HookedTransformer, backward passes"] = ("hooked", "backward")
    return found


def run_once(args, backend: str, mode: str, out: Path) -> dict:
    from bench_load import run_child

    return run_child(CHILD, [args.model, backend, mode, str(args.max_tokens), str(out)], args.threads,
                     f"attribution ({backend}, {mode})")


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name, or 'tiny' (random)")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens of the conversation attributed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.max_tokens < 8:
        parser.error(f"--max-tokens must be >= 8, got {args.max_tokens}")

    found = variants()
    runs = {name: [] for name in found}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-attribution-") as tmp:
        values = {}
        for _ in range(args.rounds):
            for name, (backend, mode) in found.items():
                out = Path(tmp) / f"{backend}-{mode}.npy"
                runs[name].append(run_once(args, backend, mode, out))
                values[name] = np.load(out)
    unit = next(iter(found))
    base = min(r["cpu"] for r in runs[unit])
    tl = importlib.metadata.version("transformer-lens")
    first = runs[unit][0]
    print(f"{args.model}, {first['tokens']} tokens x {first['hooks']} hooks, TransformerLens {tl}, "
          f"{args.threads} threads, {args.rounds} rounds, {platform.machine()}, started {started}")
    print(f"| variant | class | CPU s (best) | wall s (best) | every round (CPU s) | peak RSS GB | x {unit} (CPU) "
          "| max abs diff |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    table = {}
    for name, rows in runs.items():
        cpu, wall = min(r["cpu"] for r in rows), min(r["wall"] for r in rows)
        # the random tiny models differ by backend: compare with the same backend's forward mode there
        ref = unit if args.model != "tiny" else f"{name.split(',')[0]}, forward mode"
        diff = float(np.nanmax(np.abs(values[name] - values[ref])))
        table[name] = {"rounds": rows, "cpu": cpu, "wall": wall, "ratio": cpu / base, "max_abs_diff": diff}
        every = ", ".join(f"{r['cpu']:.2f}" for r in rows)
        print(f"| {name} | {rows[0]['class']} | {cpu:.2f} | {wall:.2f} | {every} | "
              f"{max(r['peak_rss_gb'] for r in rows):.2f} | {cpu / base:.2f} | {diff:.1e} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "transformer_lens": tl, "started": started, "threads": args.threads,
                       "max_tokens": args.max_tokens, "variants": table}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
