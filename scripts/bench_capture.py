"""Benchmark: capture against its peers on the same job.

The job: every layer's residual stream (the embedding + each block's output, 31 arrays on
SmolLM2-135M) plus per-token input surprise and output entropy, for ``--n-sequences`` sequences of
``--seq-len`` tokens in batches of ``--batch-size``, written to disk. Methods, each in its own
child process (so memory and CPU time are its own), best of ``--repeats`` timed runs:

- ``hf_forward``: plain Hugging Face forward, logits only, nothing kept (the unit of every ratio);
- ``hf_hidden_states``: ``output_hidden_states=True``, metrics from the logits, one ``.npy`` per batch
  (Hugging Face's last hidden state is after the final norm; the others are block outputs);
- ``nnsight``: ``LanguageModel.trace`` on the same Hugging Face model, ``.save()`` of the embedding,
  every decoder layer's output and the logits, metrics, one ``.npy`` per batch;
- ``tl_forward``: TransformerLens HookedTransformer plain forward (no recording, no metrics);
- ``tl_run_with_cache``: ``run_with_cache`` filtered to the 31 hooks, metrics, one ``.npy`` per batch;
- ``sp_capture``: ``surprise_probe.core.capture.run(..., out_dir=...)`` (HookedTransformer backend, default);
- ``sp_capture_usual_layout``: the same with the weights in TransformerLens' usual layout
  (``loading.FORWARD_LAYOUT_AT_LOAD = False``: its forward then copies them at every call);
- ``sp_capture_bridge``: the same on the TransformerBridge backend (the Hugging Face modules, its
  attention fused: ``surprise_probe.core.models.attention.fuse_bridge_attention``);
- ``sp_capture_bridge_unfused``: the same with the bridge's own step-by-step attention.

``--other-python PYTHON`` also runs the bridge methods under another interpreter (a venv with
another TransformerLens, e.g. 4.3 beside this one's 3.9) in the same run, as rows
``sp_capture_bridge@tl4.3.0``: both TransformerLens versions against the same Hugging Face unit.

Measures: CPU seconds of the child during the timed run (``time.process_time``, all threads; the
main figure, since other jobs share the cores), wall seconds, resident memory sampled every 10 ms
during the run (peak, and before the run), and the child's ``ru_maxrss`` (includes model loading).
Results are checked equal across methods: layer ``--check-layer``'s activations of the first batch
(relative to Hugging Face's hidden state) and every token's surprise and entropy.

Peers are optional: after torch and the project, ``pip install -e .[bench]`` (nnsight, pinned) and
``pip install --no-deps steering-vectors==0.12.2`` (it declares transformers<5 but runs on 5; see
pyproject.toml); a method whose package is missing is reported as skipped.

    flock /tmp/sp-model.lock python scripts/bench_capture.py --out runs/bench/capture   # SmolLM2-135M
    python scripts/bench_capture.py --model tiny --n-sequences 16 --seq-len 32          # smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

METHODS = ["hf_forward", "hf_hidden_states", "nnsight", "tl_forward", "tl_run_with_cache", "sp_capture",
           "sp_capture_usual_layout", "sp_capture_bridge", "sp_capture_bridge_unfused"]
BRIDGE_METHODS = ("sp_capture_bridge", "sp_capture_bridge_unfused")
NEEDS = {"nnsight": "nnsight"}


class RssSampler:
    """Samples this process's resident memory (``VmRSS``) every ``interval`` seconds while active.

    ``ru_maxrss`` is a high-water mark for the whole process, so the model load (which briefly
    holds a Hugging Face and a TransformerLens copy) would hide the run itself.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def current_kb() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.current_kb())
            time.sleep(self.interval)

    def __enter__(self):
        self.start_kb = self.current_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.current_kb())


def peer_versions() -> dict[str, str]:
    """Installed versions of the peers (the ``[bench]`` extra)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("nnsight", "steering-vectors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _tiny_folder(folder: Path) -> Path:
    """A random 4-layer Llama saved as a Hugging Face folder (offline smoke runs)."""
    from surprise_probe.testing import tiny_llama_folder

    return tiny_llama_folder(folder, n_layers=4, n_ctx=256, pad=True)[0]


def _corpus(folder: Path, n_sequences: int, seq_len: int) -> np.ndarray:
    """(n_sequences, seq_len) token ids cut from the built-in texts, tokenized as the toolkit does."""
    from transformers import AutoTokenizer

    from surprise_probe.core.text.files import builtin_items

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = []
    for item in builtin_items():
        if "messages" in item:
            ids += list(tokenizer.apply_chat_template(item["messages"], tokenize=True, return_dict=True)["input_ids"])
        elif "text" in item:
            ids += tokenizer(item["text"])["input_ids"]
    stream = np.asarray(ids, dtype=np.int64) % len(tokenizer)
    need = n_sequences * seq_len
    stream = np.tile(stream, need // len(stream) + 1)[:need]
    return stream.reshape(n_sequences, seq_len)


def _metrics(logits, tokens):
    """A peer's own surprise and entropy: float32 ``log_softmax`` over the full logits."""
    import torch

    log_probs = torch.log_softmax(logits.float(), -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    surprise = torch.full(tokens.shape, float("nan"))
    surprise[:, 1:] = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return surprise, entropy


def _save_batch(out: Path, index: int, activations, surprise, entropy) -> None:
    """What a user of a peer writes per batch: the stacked activations and the two metrics."""
    np.save(out / f"acts_{index:05d}.npy", activations.numpy())
    np.save(out / f"metrics_{index:05d}.npy", np.stack([surprise.numpy(), entropy.numpy()]))


def _load(method: str, folder: Path):
    import torch

    method = method.split("@")[0]  # "sp_capture_bridge@tl4.3.0": the method, run by another interpreter
    if method.startswith("hf_") or method == "nnsight":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if method == "nnsight":
            from nnsight import LanguageModel

            return LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(folder))
        return model
    from surprise_probe.core.models import loading
    from surprise_probe.core.models.attention import fuse_bridge_attention
    from surprise_probe.core.models.loading import load_model

    if method == "sp_capture_usual_layout":  # the HookedTransformer's weights as TransformerLens lays them out
        loading.FORWARD_LAYOUT_AT_LOAD = False
    model = load_model(str(folder), device="cpu", backend="bridge" if "_bridge" in method else "hooked",
                       progress=False)
    if method == "sp_capture_bridge_unfused":
        fuse_bridge_attention(model, enable=False)
    return model


def _run(method: str, model, ids, batch_size: int, out: Path) -> None:
    """One timed run of ``method`` over all of ``ids``, writing into ``out``."""
    import torch

    import surprise_probe as sp
    from surprise_probe.core.forward.hooks import default_hooks

    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    method = method.split("@")[0]
    if method == "hf_forward":
        for tokens in batches:
            model(tokens, attention_mask=torch.ones_like(tokens))
    elif method == "hf_hidden_states":
        for b, tokens in enumerate(batches):
            result = model(tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True)
            surprise, entropy = _metrics(result.logits, tokens)
            _save_batch(out, b, torch.stack(result.hidden_states), surprise, entropy)
    elif method == "nnsight":
        layers = model.model.layers
        for b, tokens in enumerate(batches):
            saved = {}
            with model.trace(tokens, attention_mask=torch.ones_like(tokens)):
                saved["embed"] = model.model.embed_tokens.output.save()
                for i in range(len(layers)):
                    saved[i] = layers[i].output.save()
                saved["logits"] = model.lm_head.output.save()
            outputs = [saved[i] if torch.is_tensor(saved[i]) else saved[i][0] for i in range(len(layers))]
            surprise, entropy = _metrics(saved["logits"], tokens)
            _save_batch(out, b, torch.stack([saved["embed"], *outputs]), surprise, entropy)
    elif method == "tl_forward":
        for tokens in batches:
            model(tokens, attention_mask=torch.ones_like(tokens))
    elif method == "tl_run_with_cache":
        hooks = default_hooks(model)
        for b, tokens in enumerate(batches):
            logits, cache = model.run_with_cache(tokens, attention_mask=torch.ones_like(tokens),
                                                 names_filter=lambda name: name in hooks)
            surprise, entropy = _metrics(logits, tokens)
            _save_batch(out, b, torch.stack([cache[h] for h in hooks]), surprise, entropy)
            del cache
    elif method in ("sp_capture", "sp_capture_usual_layout", *BRIDGE_METHODS):
        sp.capture(model, [{"token_ids": row.tolist()} for row in ids], out_dir=out / "capture",
                   batch_size=batch_size, progress=False)
    else:
        raise ValueError(method)


def _results(method: str, out: Path, layer: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray] | None:
    """Layer ``layer``'s activations of the first batch, and every token's surprise and entropy."""
    if method in ("hf_forward", "tl_forward"):
        return None
    if method.startswith("sp_capture"):
        from surprise_probe.core.capture.store import load_capture

        run = load_capture(out / "capture")
        acts = run.activations(f"blocks.{layer}.hook_resid_post")[: batch_size * seq_len]
        return {"acts": acts, "surprise": run.column("input_surprise"), "entropy": run.column("output_entropy")}
    files = sorted(out.glob("metrics_*.npy"))
    metrics = np.concatenate([np.load(f).reshape(2, -1) for f in files], axis=1)
    first = np.load(out / "acts_00000.npy", mmap_mode="r")
    return {"acts": np.asarray(first[layer + 1]).reshape(-1, first.shape[-1]), "surprise": metrics[0],
            "entropy": metrics[1]}


def child(method: str, folder: Path, corpus: Path, batch_size: int, repeats: int, threads: int, work: Path,
          layer: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    ids = torch.from_numpy(np.load(corpus))
    model = _load(method, folder)
    with torch.inference_mode():
        _run(method, model, ids[:batch_size, :16], batch_size, Path(tempfile.mkdtemp(dir=work)))  # warm-up
    gc.collect()
    cpu, wall = [], []
    sampler = RssSampler().__enter__()
    for repeat in range(repeats):
        out = work / f"{method}-{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            _run(method, model, ids, batch_size, out)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    sampler.__exit__(None, None, None)
    results = _results(method, work / f"{method}-{repeats - 1}", layer, batch_size, ids.shape[1])
    if results is not None:
        np.savez(work / f"{method}.npz", **results)
    for repeat in range(repeats):
        shutil.rmtree(work / f"{method}-{repeat}", ignore_errors=True)
    import importlib.metadata

    return {"method": method, "transformer_lens": importlib.metadata.version("transformer-lens"),
            "cpu_seconds": min(cpu), "all_cpu_seconds": [round(t, 2) for t in cpu],
            "wall_seconds": min(wall), "all_wall_seconds": [round(t, 2) for t in wall],
            "rss_before_mb": sampler.start_kb / 1024, "peak_rss_mb": sampler.peak_kb / 1024,
            "threads": torch.get_num_threads()}


def _compare(work: Path, method: str, reference: str) -> dict:
    """Relative error of the activations (max abs diff / max abs) and max abs diff of the metrics."""
    mine, ref = work / f"{method}.npz", work / f"{reference}.npz"
    if not mine.exists() or not ref.exists():
        return {}
    a, b = np.load(mine), np.load(ref)
    out = {"acts_rel_err": float(np.abs(a["acts"] - b["acts"]).max() / np.abs(b["acts"]).max())}
    for name in ("surprise", "entropy"):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        both = np.isfinite(x) & np.isfinite(y)
        out[f"{name}_max_abs_diff"] = float(np.abs(x[both] - y[both]).max())
        out[f"{name}_nan_positions_equal"] = bool((np.isnan(x) == np.isnan(y)).all())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model name, a Hugging Face "
                        "folder, or 'tiny' (a random 4-layer Llama, for smoke runs)")
    parser.add_argument("--n-sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (the best is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method's child this many times, round-robin (method A, B, ..., A, B, ...), "
                             "so a drift of the host's speed reaches every method alike; the best over all is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    parser.add_argument("--check-layer", type=int, default=17, help="layer whose activations are compared")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_capture.md and .json")
    parser.add_argument("--other-python", default=None, help="also run the bridge methods under this "
                        "interpreter (a venv with another TransformerLens and this project installed)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    if args.child:
        method, folder, corpus, batch_size, repeats, threads, work, layer = args.child
        row = child(method, Path(folder), Path(corpus), int(batch_size), int(repeats), int(threads), Path(work),
                    int(layer))
        (Path(work) / f"{method}.json").write_text(json.dumps(row))
        return 0

    from surprise_probe.core.models.loading import EMBEDDED_MODELS, embedded_folder
    from surprise_probe.core.utils.jsonio import software_versions, write_json

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        work = Path(tmp)
        if args.model == "tiny":
            folder = _tiny_folder(work / "tiny-model")
            layer = min(args.check_layer, 2)
        else:
            folder = embedded_folder(args.model) if args.model.lower() in EMBEDDED_MODELS else Path(args.model)
            layer = args.check_layer
        corpus = work / "corpus.npy"
        np.save(corpus, _corpus(folder, args.n_sequences, args.seq_len))
        rows = []
        runs = [(method, sys.executable) for method in args.methods]
        if args.other_python:
            version = subprocess.run(
                [args.other_python, "-c", "import importlib.metadata as m; print(m.version('transformer-lens'))"],
                check=True, capture_output=True, text=True).stdout.strip()
            runs += [(f"{method}@tl{version}", args.other_python) for method in args.methods if method in BRIDGE_METHODS]
        by_method: dict[str, dict] = {}
        for round_index, (method, python) in enumerate(runs * args.rounds):
            if method in NEEDS and importlib.util.find_spec(NEEDS[method]) is None:
                if round_index < len(runs):
                    print(f"{method:<18} skipped: {NEEDS[method]} is not installed (pip install -e .[bench])",
                          flush=True)
                continue
            cmd = [python, __file__, "--child", method, str(folder), str(corpus), str(args.batch_size),
                   str(args.repeats), str(args.threads), str(work), str(layer)]
            with open(work / f"{method}.log", "w") as log:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                print((work / f"{method}.log").read_text()[-3000:], file=sys.stderr)
                raise RuntimeError(f"{method} failed with exit code {process.returncode}")
            row = json.loads((work / f"{method}.json").read_text())
            row["child_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
            row["child_maxrss_mb"] = usage.ru_maxrss / 1024
            print(f"{method:<28} {row['cpu_seconds']:8.2f} CPU s  {row['wall_seconds']:8.2f} wall s  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
            if method in by_method:  # a later round: the best over rounds, every timing kept
                first = by_method[method]
                for key in ("all_cpu_seconds", "all_wall_seconds"):
                    first[key] = first[key] + row[key]
                for key in ("cpu_seconds", "wall_seconds"):
                    first[key] = min(first[key], row[key])
                for key in ("peak_rss_mb", "child_maxrss_mb"):
                    first[key] = max(first[key], row[key])
                first["child_cpu_seconds_total"] += row["child_cpu_seconds_total"]
            else:
                by_method[method] = row
                rows.append(row)
        reference = "hf_hidden_states" if any(r["method"] == "hf_hidden_states" for r in rows) else None
        for row in rows:
            row["agreement"] = _compare(work, row["method"], reference) if reference else {}
    by = {r["method"]: r for r in rows}
    unit = by.get("hf_forward") or rows[0]
    n_tokens = args.n_sequences * args.seq_len
    lines = [
        f"model `{args.model}`, {args.n_sequences} x {args.seq_len} tokens ({n_tokens}) in batches of "
        f"{args.batch_size}, float32, CPU ({platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
        f"threads per child), each method in its own process, best of {args.repeats}"
        + (f" x {args.rounds} rounds (round-robin)" if args.rounds > 1 else "") + "; ratios against "
        f"`{unit['method']}`; agreement against `{reference}` (layer {layer} activations of the first batch, "
        "every token's surprise and entropy)",
        "",
        "| method | TransformerLens | CPU s | x HF forward (CPU) | wall s | x HF forward (wall) | peak RSS (MB) | RSS before (MB) "
        "| layer acts rel. err | surprise max diff | entropy max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        agree = row["agreement"]

        def fmt(key, agree=agree):
            return f"{agree[key]:.1e}" if key in agree else "-"

        row["cpu_ratio"] = row["cpu_seconds"] / unit["cpu_seconds"]
        row["wall_ratio"] = row["wall_seconds"] / unit["wall_seconds"]
        lines.append(
            f"| {row['method']} | {row['transformer_lens']} | {row['cpu_seconds']:.2f} | {row['cpu_ratio']:.3f} | {row['wall_seconds']:.2f} | "
            f"{row['wall_ratio']:.3f} | {row['peak_rss_mb']:.0f} | {row['rss_before_mb']:.0f} | "
            f"{fmt('acts_rel_err')} | {fmt('surprise_max_abs_diff')} | {fmt('entropy_max_abs_diff')} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_capture.md").write_text(table + "\n")
        write_json(args.out / "bench_capture.json", {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"},
            "rows": rows, "versions": {**software_versions(), **peer_versions()},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
