"""Benchmark: batched steering sweep vs the one-condition loop and vs the compute floor.

    python scripts/bench_steering.py                                  # tiny random model, offline
    python scripts/bench_steering.py --model smollm2-135m-instruct --out runs/bench_steering

In one run: the same dose-response (probe-like direction + orthogonal + k random directions,
every strength, every input) through the one-condition loop (``batched=False``, the naive
reference: one forward per condition, every condition including strength 0, as a hand-written
loop does) and the batched sweep, which must agree to ``--atol``; and the *floor*: for each
input, one clean forward up to the hook plus, for the N conditions the sweep must actually run,
forwards from the hook to the logits at the scored positions only (``start_at_layer``, same rows
per forward as the sweep, no metrics). N counts the distinct non-identity conditions: a
strength-0 condition is the clean run (``interventions.steering_sweep.identity_amounts``) and a repeated
strength repeats a condition, so the sweep runs neither and the floor does not count them (x floor
time stays like for like). The floor has no key-value cache sharing, so a sweep that shares the
prompt can come in under it.
Prints a markdown table; with ``--out`` also writes ``bench_steering.json``.

With ``--peers``: the same dose-response (all positions steered, ``--peer-directions`` directions
= probe-like + orthogonal + random, x the strengths) through each method in its own child process
(so CPU time and peak memory are its own), best of ``--repeats``: steering-vectors'
``SteeringVector.apply`` loop on the Hugging Face model (one condition per forward over the padded
batch of conversations), a TransformerLens ``run_with_hooks`` loop, and surprise-probe's
``dose_response`` batched and ``batched=False``; the TransformerLens methods run on the
HookedTransformer where TransformerLens has it (3.x) and on the TransformerBridge otherwise (4.x),
and ``sp_batched_bridge`` runs the batched sweep on the bridge on 3.x as well. Every method computes mean entropy, KL to the clean
run and top-1 agreement over the scored (response) tokens, and the tables are compared. Peers are
optional: after torch and the project, ``pip install -e .[bench]`` and
``pip install --no-deps steering-vectors==0.12.2`` (a missing one is reported as skipped).

    flock /tmp/sp-model.lock python scripts/bench_steering.py --peers --model smollm2-135m-instruct \
        --layer 17 --strengths -4 -2 0 2 4 --repeats 2 --out runs/bench/steering_peers
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
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
        from surprise_probe.core.text.files import builtin_items

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
    from surprise_probe.core.forward.passes import forward
    from surprise_probe.core.text.encoding import pad_batch, pad_id

    batch = pad_batch(encoded, pad_id(model))
    with torch.no_grad():
        _, acts = forward(model, batch, [hook])
    return float((acts[hook][batch.scored].float() @ direction).std())


def _sweep_job(model, args):
    """The benchmarked dose-response: its layer and hook (default the middle layer), the encoded
    inputs, a seeded random unit direction with its projection's std, and the sweep's options."""
    from surprise_probe.interventions import SteeringDirection

    from surprise_probe.core.text.encoding import encode_all

    layer = int(model.cfg.n_layers) // 2 if args.layer is None else args.layer
    hook = f"blocks.{layer}.hook_resid_post"
    encoded = encode_all(model, _items(model, args.n_inputs), truncate=True)
    d = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    direction = SteeringDirection(d, hook, _projection_std(model, encoded, hook, d))
    kwargs = dict(random_directions=args.random_directions, batch_size=args.batch_size,
                  max_batch_tokens=args.max_batch_tokens, progress=False, n_boot=10)
    return layer, hook, encoded, direction, kwargs


@torch.no_grad()
def _floor(model, encoded, layer: int, n_conditions: int, batch_size: int, max_batch_tokens: int) -> None:
    """The floor's work: per input, the clean forward up to the hook, then ``n_conditions`` rows
    from the hook to the logits at the scored positions (full sequence, no cache, no metrics)."""
    from surprise_probe.core.forward.passes import unembed

    for item in encoded:
        tokens = torch.as_tensor(item.token_ids, dtype=torch.long).unsqueeze(0)
        at = torch.as_tensor(item.scored, dtype=torch.bool)
        residual = model(tokens, stop_at_layer=layer + 1)
        rows = max(1, min(batch_size, max_batch_tokens // len(item.token_ids)))
        for k in range(0, n_conditions, rows):
            n = min(rows, n_conditions - k)
            final = model(residual.expand(n, -1, -1), start_at_layer=layer + 1, stop_at_layer=int(model.cfg.n_layers))
            unembed(model, final[:, at])


# --- Peers (--peers): each method in its own child process -------------------------------------

PEER_METHODS = ["sv_loop", "tl_hooks_loop", "sp_batched", "sp_batched_bridge", "sp_loop"]
PEER_NEEDS = {"sv_loop": "steering_vectors"}


def _peer_backend(method: str) -> str:
    """The TransformerLens model a method runs on: ``*_bridge`` the TransformerBridge, the others the
    HookedTransformer where TransformerLens has it (3.x), else the bridge (4.x)."""
    from surprise_probe.core.models.backends import hooked_transformer_available

    return "bridge" if method.endswith("_bridge") or not hooked_transformer_available() else "hooked"


def _peer_folder(name: str, work: Path) -> Path:
    """The Hugging Face folder every child loads: an embedded model's cache, a folder, or a tiny Llama."""
    from surprise_probe.core.models.loading import EMBEDDED_MODELS, embedded_folder

    if name.lower() in EMBEDDED_MODELS:
        return embedded_folder(name.lower())
    if name != "tiny":
        return Path(name)
    from surprise_probe.testing import tiny_llama_folder

    return tiny_llama_folder(work / "tiny-model", n_layers=4, n_ctx=256, pad=True)[0]


def _peer_job(args, folder: Path, work: Path) -> dict:
    """Encode the conversations and build the directions once, for every child."""
    from surprise_probe.interventions import SteeringDirection
    from surprise_probe.interventions.dose_response import control_directions

    from surprise_probe.core.models.loading import load_model
    from surprise_probe.core.text.encoding import encode_all

    model = load_model(str(folder), device="cpu", backend=_peer_backend("sp_batched"), progress=False)
    layer = int(model.cfg.n_layers) // 2 if args.layer is None else min(args.layer, int(model.cfg.n_layers) - 1)
    hook = f"blocks.{layer}.hook_resid_post"
    encoded = encode_all(model, _items(model, args.n_inputs), truncate=True)
    d = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    std = _projection_std(model, encoded, hook, d)
    vectors, labels = control_directions(SteeringDirection(d, hook, std), args.peer_directions - 2, seed=0)
    job = {"layer": layer, "hook": hook, "std": std, "strengths": [float(a) for a in args.strengths],
           "vectors": vectors.tolist(), "labels": labels, "pad_id": int(model.tokenizer.pad_token_id),
           "items": [{"token_ids": e.token_ids.tolist(), "scored": e.scored.tolist()} for e in encoded]}
    (work / "job.json").write_text(json.dumps(job))
    return job


def _padded(items: list[dict], pad: int):
    """Right-padded token ids, attention mask and scored mask of all conversations (one batch)."""
    width = max(len(item["token_ids"]) for item in items)
    tokens = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    scored = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item["token_ids"])
        tokens[row, :n] = torch.tensor(item["token_ids"])
        mask[row, :n] = 1
        scored[row, :n] = torch.tensor(item["scored"])
    return tokens, mask, scored


def _peer_loop(forward, scored, vectors, strengths) -> dict[str, np.ndarray]:
    """What a peer's user writes: the clean run, then one forward per (direction, strength) over the
    batch; mean entropy, KL(steered || clean) and top-1 agreement over the scored tokens."""
    clean = torch.log_softmax(forward(None, 0.0)[scored].float(), -1)
    shape = (len(vectors), len(strengths))
    out = {name: np.zeros(shape) for name in ("entropy", "kl", "agree")}
    for i, vector in enumerate(vectors):
        for j, strength in enumerate(strengths):
            log_probs = torch.log_softmax(forward(vector, strength)[scored].float(), -1)
            probs = log_probs.exp()
            out["entropy"][i, j] = float(-(probs * log_probs).sum(-1).mean())
            out["kl"][i, j] = float((probs * (log_probs - clean)).sum(-1).mean())
            out["agree"][i, j] = float((log_probs.argmax(-1) == clean.argmax(-1)).double().mean())
    return out


def _peer_run(method: str, model, job: dict) -> tuple[dict[str, np.ndarray], int]:
    """One dose-response by ``method``; returns the (direction x strength) tables and forwards run."""
    vectors = torch.tensor(job["vectors"], dtype=torch.float32)
    strengths, std, layer, hook = job["strengths"], job["std"], job["layer"], job["hook"]
    n_forwards = 1 + len(vectors) * len(strengths)
    if method in ("sp_batched", "sp_batched_bridge", "sp_loop"):
        from surprise_probe.interventions import SteeringDirection, dose_response

        result = dose_response(model, job["items"], SteeringDirection(vectors[0], hook, std), strengths,
                               random_directions=len(vectors) - 2, positions="all",
                               batched=method != "sp_loop", seed=0, progress=False)
        tables = {"entropy": np.asarray(result.entropy), "kl": np.asarray(result.kl),
                  "agree": np.asarray(result.top1_agreement)}
        return tables, result.n_forwards
    tokens, mask, scored = _padded(job["items"], job["pad_id"])
    if method == "sv_loop":
        from steering_vectors import SteeringVector

        def forward(vector, strength):
            if vector is None:
                return model(tokens, attention_mask=mask).logits
            steering = SteeringVector(layer_activations={layer: vector * std}, layer_type="decoder_block")
            with steering.apply(model, multiplier=strength, min_token_index=0):
                return model(tokens, attention_mask=mask).logits
    elif method == "tl_hooks_loop":
        def forward(vector, strength):
            if vector is None:
                return model(tokens, attention_mask=mask)
            added = strength * std * vector

            def add(activation, hook):  # noqa: ARG001 - TransformerLens hook signature
                return activation + added

            return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(hook, add)])
    else:
        raise ValueError(method)
    return _peer_loop(forward, scored, vectors, strengths), n_forwards


def _peer_child(method: str, folder: Path, work: Path, threads: int, repeats: int) -> dict:
    from bench_capture import RssSampler

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    job = json.loads((work / "job.json").read_text())
    if method == "sv_loop":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        from surprise_probe.core.models.loading import load_model

        model = load_model(str(folder), device="cpu", backend=_peer_backend(method), progress=False)
    warm = dict(job, items=job["items"][:1], vectors=job["vectors"][:2], strengths=job["strengths"][:2])
    with torch.inference_mode():
        _peer_run(method, model, warm)
    gc.collect()
    cpu, wall = [], []
    sampler = RssSampler().__enter__()
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            tables, n_forwards = _peer_run(method, model, job)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    sampler.__exit__(None, None, None)
    np.savez(work / f"{method}.npz", **tables)
    return {"method": method, "cpu_seconds": min(cpu), "all_cpu_seconds": [round(t, 2) for t in cpu],
            "wall_seconds": min(wall), "all_wall_seconds": [round(t, 2) for t in wall],
            "rss_before_mb": sampler.start_kb / 1024, "peak_rss_mb": sampler.peak_kb / 1024,
            "n_forwards": n_forwards, "threads": torch.get_num_threads(), "class": type(model).__name__}


def peers_main(args) -> int:
    from bench_capture import peer_versions

    from surprise_probe.core.utils.jsonio import software_versions, write_json

    with tempfile.TemporaryDirectory(prefix="bench-steering-") as tmp:
        work = Path(tmp)
        folder = _peer_folder(args.model, work)
        job = _peer_job(args, folder, work)
        rows = []
        for method in args.peer_methods:
            if method == "sp_batched_bridge" and _peer_backend("sp_batched") == "bridge":
                print(f"{method:<14} skipped: sp_batched runs on the bridge already (no HookedTransformer here)")
                continue
            if method in PEER_NEEDS and importlib.util.find_spec(PEER_NEEDS[method]) is None:
                print(f"{method:<14} skipped: {PEER_NEEDS[method]} is not installed (pip install -e .[bench])")
                continue
            cmd = [sys.executable, __file__, "--peer-child", method, str(folder), str(work), str(args.threads or 2),
                   str(args.repeats)]
            with open(work / f"{method}.log", "w") as log:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(process.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                print((work / f"{method}.log").read_text()[-3000:], file=sys.stderr)
                raise RuntimeError(f"{method} failed")
            row = json.loads((work / f"{method}.json").read_text())
            row["child_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
            row["child_maxrss_mb"] = usage.ru_maxrss / 1024
            rows.append(row)
            print(f"{method:<14} {row['cpu_seconds']:8.2f} CPU s  {row['wall_seconds']:8.2f} wall s  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
        tables = {row["method"]: dict(np.load(work / f"{row['method']}.npz")) for row in rows}
    unit = next((r for r in rows if r["method"] == "sv_loop"), rows[0])
    for row in rows:
        ref, mine = tables[unit["method"]], tables[row["method"]]
        row["max_abs_diff"] = {k: float(np.abs(mine[k] - ref[k]).max()) for k in ("entropy", "kl", "agree")}
        row["cpu_ratio"] = row["cpu_seconds"] / unit["cpu_seconds"]
        row["wall_ratio"] = row["wall_seconds"] / unit["wall_seconds"]
        row["rss_ratio"] = row["peak_rss_mb"] / unit["peak_rss_mb"]
        row["mean_entropy"] = tables[row["method"]]["entropy"].tolist()
    n_tokens = sum(int(np.sum(item["scored"])) for item in job["items"])
    lengths = [len(item["token_ids"]) for item in job["items"]]
    lines = [
        f"model `{args.model}`, `{job['hook']}`, {len(job['items'])} conversations ({sum(lengths)} tokens, "
        f"{min(lengths)}-{max(lengths)} each, {n_tokens} scored), all positions steered, "
        f"{len(job['vectors'])} directions x {len(job['strengths'])} strengths = "
        f"{len(job['vectors']) * len(job['strengths'])} conditions, float32, CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads or 2} torch threads per child), each method in its own process, "
        f"best of {args.repeats}; ratios and differences against `{unit['method']}`",
        "",
        "| method | model | forwards | CPU s | x sv loop (CPU) | wall s | x sv loop (wall) | peak RSS (MB) | x sv loop (RSS) "
        "| max diff entropy | max diff KL | max diff top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        diff = row["max_abs_diff"]
        lines.append(
            f"| {row['method']} | {row['class']} | {row['n_forwards']} | {row['cpu_seconds']:.2f} | {row['cpu_ratio']:.3f} | "
            f"{row['wall_seconds']:.2f} | {row['wall_ratio']:.3f} | {row['peak_rss_mb']:.0f} | {row['rss_ratio']:.2f} | "
            f"{diff['entropy']:.1e} | {diff['kl']:.1e} | {diff['agree']:.1e} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_steering_peers.md").write_text(table + "\n")
        write_json(args.out / "bench_steering_peers.json", {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "peer_child"},
            "hook": job["hook"], "std": job["std"], "labels": job["labels"], "rows": rows,
            "versions": {**software_versions(), **peer_versions()},
        })
    return 0


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
    parser.add_argument("--atol", type=float, default=1e-5, help="entropy and KL, batched vs loop")
    parser.add_argument("--no-fused-attention", action="store_true",
                        help="the sweep runs the model's own attention (interventions.suffix.FUSE_ATTENTION)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--peers", action="store_true", help="compare with the peers, each in its own process")
    parser.add_argument("--peer-methods", nargs="+", default=PEER_METHODS, choices=PEER_METHODS)
    parser.add_argument("--peer-directions", type=int, default=6, help="with --peers: probe + orthogonal + random")
    parser.add_argument("--peer-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--backends", action="store_true",
                        help="the same batched dose-response on the HookedTransformer (suffix engine) and the "
                             "TransformerBridge (fan-out, prompt run once and whole sequences), one run")
    args = parser.parse_args(argv)
    if args.peer_child:
        method, folder, work, threads, repeats = args.peer_child
        row = _peer_child(method, Path(folder), Path(work), int(threads), int(repeats))
        (Path(work) / f"{method}.json").write_text(json.dumps(row))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peers:
        return peers_main(args)
    if args.backends:
        return backends_main(args)

    from surprise_probe.interventions import dose_response, suffix
    from surprise_probe.interventions.steering_sweep import identity_amounts

    from surprise_probe.core.utils.jsonio import software_versions, write_json

    model = _model(args.model, args.device)
    suffix.FUSE_ATTENTION = not args.no_fused_attention
    layer, hook, encoded, direction, kwargs = _sweep_job(model, args)
    dose_response(model, encoded[:1], direction, args.strengths[:2], random_directions=0, progress=False)  # warm-up

    timings, results = {}, {}
    n_directions = 2 + args.random_directions
    n_conditions = n_directions * len(args.strengths)
    # What the sweep must run: each distinct strength that is not the identity, per direction.
    identity = identity_amounts("steer", args.strengths)
    n_run = n_directions * len({s for s, same in zip(args.strengths, identity, strict=True) if not same})
    wall = {}
    for mode in ("loop", "batched", "floor"):
        best, best_wall = float("inf"), float("inf")
        for _ in range(args.repeats):
            # CPU time of this process is the measure: on a shared machine the wall clock also
            # counts other processes' work (both are recorded).
            start, start_wall = time.process_time(), time.perf_counter()
            if mode == "floor":
                _floor(model, encoded, layer, n_run, args.batch_size, args.max_batch_tokens)
            else:
                results[mode] = dose_response(model, encoded, direction, args.strengths, batched=mode == "batched", **kwargs)
            best = min(best, time.process_time() - start)
            best_wall = min(best_wall, time.perf_counter() - start_wall)
        timings[mode], wall[mode] = best, best_wall
    def gap(key: str) -> np.ndarray:
        return np.abs(np.asarray(getattr(results["batched"], key)) - np.asarray(getattr(results["loop"], key)))

    # Entropy and KL are continuous in the logits and must agree to atol. Top-1 agreement is not:
    # where the two best logits of a row are within float rounding of each other, any change of
    # accumulation order (a fused attention kernel, a different matmul blocking) can flip the
    # argmax; such flips are counted in tokens and reported, not failed on.
    diff = max(float(gap("entropy").max()), float(gap("kl").max()))
    n_flipped = int(np.round(gap("top1_agreement") * results["batched"].n_tokens).sum())
    speedup = timings["loop"] / timings["batched"]
    over_floor = timings["batched"] / timings["floor"]
    n_tokens = results["batched"].n_tokens
    n_skipped = n_conditions - n_run
    print(f"model {model.cfg.model_name}, hook {hook}, {len(encoded)} inputs ({n_tokens} scored tokens), "
          f"{len(results['batched'].labels)} directions x {len(args.strengths)} strengths = {n_conditions} conditions, "
          f"of which the sweep must run N = {n_run} (distinct, non-identity; {n_skipped} are the clean run "
          f"(strength 0) or repeats), batch size {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    print("The loop is the naive reference: one forward per condition, all of them including strength 0, "
          "as a hand-written loop does.")
    print()
    print(f"| mode | forward passes | CPU seconds (best of {args.repeats}) | wall seconds | x loop speed | "
          f"x floor time (floor over N = {n_run} conditions) | max abs diff vs loop (entropy, KL) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| loop (naive: one condition per forward, all {n_conditions} incl. strength 0) | "
          f"{results['loop'].n_forwards} | {timings['loop']:.2f} | "
          f"{wall['loop']:.2f} | 1.00 | {timings['loop'] / timings['floor']:.2f} | 0 |")
    print(f"| batched sweep ({n_run} conditions run, strength 0 from the clean run) | {results['batched'].n_forwards} | "
          f"{timings['batched']:.2f} | {wall['batched']:.2f} | {speedup:.2f} | {over_floor:.2f} | {diff:.2e} |")
    print(f"| floor (clean to hook + N = {n_run} from hook to scored logits) | | {timings['floor']:.2f} | "
          f"{wall['floor']:.2f} | {timings['loop'] / timings['floor']:.2f} | 1.00 | |")
    ok = diff <= args.atol
    print(f"\nsame entropy and KL within atol {args.atol}: {'yes' if ok else 'NO'}; top-1 agreement differs by "
          f"{n_flipped} token(s) in all {n_conditions} conditions together (argmax flips at float-rounding ties); "
          f"batched is {speedup:.2f}x faster than the loop and {over_floor:.2f}x the floor's time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "bench_steering.json", {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model_id": str(model.cfg.model_name), "hook": hook, "n_tokens": n_tokens,
            "cpu_seconds": timings, "wall_seconds": wall, "forwards": {m: r.n_forwards for m, r in results.items()},
            "speedup": speedup, "batched_over_floor": over_floor, "n_conditions": n_conditions,
            "n_conditions_run": n_run, "floor_conditions": "distinct non-identity conditions (the ones the sweep runs)",
            "loop": "naive reference: one forward per condition, every condition including strength 0",
            "max_abs_diff": diff, "max_abs_diff_of": ["entropy", "kl"], "top1_tokens_flipped": n_flipped,
            "fused_attention": suffix.FUSE_ATTENTION, "torch_threads": torch.get_num_threads(), "versions": software_versions(),
        })
    return 0 if ok else 1


def backends_main(args) -> int:
    """``--backends``: one dose-response (probe-like + orthogonal + random directions x strengths) on
    the same weights as a HookedTransformer (suffix engine) and as a TransformerBridge (fan-out
    engine from the hook on with each prompt run once and frozen; without starting at the hook; with
    whole sequences), CPU seconds best of
    ``--repeats`` (round-robin over the engines), and the largest difference of entropy and KL between backends."""
    from surprise_probe.interventions import dose_response
    from surprise_probe.interventions import steering_sweep as sweep_module

    from surprise_probe.core.models.loading import load_model
    from surprise_probe.core.utils.jsonio import software_versions, write_json
    from surprise_probe.testing import tiny_bridge, tiny_hooked_transformer

    if args.model == "tiny":  # two different random models: timings only, the diff column means nothing
        models = {"hooked": tiny_hooked_transformer(), "bridge": tiny_bridge()}
    else:
        models = {b: load_model(args.model, device=args.device, backend=b, progress=False) for b in ("hooked", "bridge")}
    _, hook, encoded, direction, kwargs = _sweep_job(models["hooked"], args)
    runs = [("hooked", "suffix engine", True, True),
            ("bridge", "fan-out from the hook on, prompt once (frozen key-value cache)", True, True),
            ("bridge", "fan-out, prompt once, the blocks before the hook per block of conditions (before)", True, False),
            ("bridge", "fan-out, whole sequences (before that)", False, False)]
    timings, results = {}, {}
    for backend, _, _, _ in runs:  # warm-up
        dose_response(models[backend], encoded[:1], direction, args.strengths[:2], random_directions=0, progress=False)
    for _ in range(args.repeats):  # round-robin: a drifting host slows every engine alike
        for backend, label, freeze, start_at_hook in runs:
            sweep_module.FREEZE_PREFIX, sweep_module.START_AT_HOOK = freeze, start_at_hook
            start = time.process_time()
            results[label] = dose_response(models[backend], encoded, direction, args.strengths, **kwargs)
            timings[label] = min(timings.get(label, float("inf")), time.process_time() - start)
    sweep_module.FREEZE_PREFIX = sweep_module.START_AT_HOOK = True
    reference = results["suffix engine"]
    n_tokens = int(sum(int(e.scored.sum()) for e in encoded))
    print(f"model {args.model}, {hook}, {len(encoded)} conversations ({n_tokens} scored tokens of "
          f"{sum(len(e.token_ids) for e in encoded)}), {2 + args.random_directions} directions x "
          f"{len(args.strengths)} strengths, torch threads {torch.get_num_threads()}")
    print(f"\n| backend | engine | CPU seconds (best of {args.repeats}) | x HookedTransformer | max abs diff vs it |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for backend, label, _, _ in runs:
        diff = max(float(np.abs(np.asarray(getattr(results[label], k)) - np.asarray(getattr(reference, k))).max())
                   for k in ("entropy", "kl"))
        ratio = timings[label] / timings["suffix engine"]
        rows.append({"backend": backend, "engine": label, "cpu_seconds": timings[label], "ratio": ratio, "diff": diff})
        print(f"| {backend} | {label} | {timings[label]:.2f} | {ratio:.2f} | {diff:.1e} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "bench_steering_backends.json", {"rows": rows, "hook": hook, "n_tokens": n_tokens,
                                                               "versions": software_versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
