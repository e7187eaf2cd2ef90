"""Benchmark: capture vs a plain forward pass vs ``run_with_cache`` keeping everything.

Every measurement runs in its own child process (so peak RSS is that method's own), on the same
batches of the same model, in one invocation of this script; ratios are against the plain forward
of the same corpus measured in the same run.

    python scripts/bench_capture.py --out runs/bench_capture            # embedded default
    python scripts/bench_capture.py --model tiny --sizes 16 32          # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class RssSampler:
    """Samples this process's resident memory (``VmRSS``) every 20 ms while active.

    ``ru_maxrss`` is a high-water mark for the whole process, so the model load (which briefly
    holds a Hugging Face and a TransformerLens copy) would hide the run itself.
    """

    def __init__(self, interval: float = 0.02):
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


def _corpus(model, n_sequences: int, seq_len: int):
    """``n_sequences`` token-id items of exactly ``seq_len`` tokens, cut from the built-in texts."""
    import numpy as np

    from surprise_probe.inputs import encode
    from surprise_probe.io import builtin_items

    stream = np.concatenate([encode(model, item, score_prompt=True, max_tokens=10**9).token_ids for item in builtin_items()])
    need = n_sequences * seq_len
    stream = np.tile(stream, need // len(stream) + 1)[:need]
    return [{"token_ids": stream[i * seq_len : (i + 1) * seq_len].tolist()} for i in range(n_sequences)]


def _load(name: str):
    if name == "tiny":
        from surprise_probe.testing import tiny_hooked_transformer

        return tiny_hooked_transformer(n_layers=4, d_model=128, n_ctx=256)
    from surprise_probe.models import load_model

    return load_model(name, progress=False)


def child(method: str, model_name: str, n_sequences: int, seq_len: int, batch_size: int, repeats: int) -> dict:
    import torch

    import surprise_probe as sp
    from surprise_probe.inputs import encode_all, pad_batch, pad_id

    torch.set_grad_enabled(False)
    model = _load(model_name)
    items = _corpus(model, n_sequences, seq_len)
    batches = [pad_batch(encode_all(model, items[i : i + batch_size]), pad_id(model))
               for i in range(0, len(items), batch_size)]
    import gc

    gc.collect()
    sampler = RssSampler().__enter__()
    times = []
    for _ in range(repeats):
        kept = []
        started = time.perf_counter()
        if method == "forward":
            for batch in batches:
                model(batch.tokens, attention_mask=batch.attention_mask)
        elif method == "forward_metrics":
            for batch in batches:
                logits = model(batch.tokens, attention_mask=batch.attention_mask)
                sp.surprise_and_entropy(logits, batch.tokens, batch.attention_mask)
        elif method in ("capture_disk", "capture_disk_3_layers"):
            layers = None if method == "capture_disk" else [0, model.cfg.n_layers // 2, model.cfg.n_layers - 1]
            with tempfile.TemporaryDirectory() as out:
                sp.capture(model, items, layers=layers, out_dir=Path(out) / "run", batch_size=batch_size,
                           shard_size=4 * batch_size, progress=False)
                times.append(time.perf_counter() - started)  # before deleting the folder
                continue
        elif method == "run_with_cache_all":
            for batch in batches:
                _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
                kept.append({name: value.cpu() for name, value in cache.items()})
        else:
            raise ValueError(method)
        times.append(time.perf_counter() - started)
        del kept
    elapsed = min(times)
    sampler.__exit__(None, None, None)
    return {"method": method, "n_sequences": n_sequences, "n_tokens": n_sequences * seq_len,
            "seconds": elapsed, "all_seconds": [round(t, 3) for t in times], "rss_before_mb": sampler.start_kb / 1024, "peak_rss_mb": sampler.peak_kb / 1024,
            "rss_growth_mb": (sampler.peak_kb - sampler.start_kb) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 192], help="corpus sizes in sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-max-sequences", type=int, default=64,
                        help="run_with_cache keeping everything only up to this size (it grows without bound)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_capture"))
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per method (the minimum is reported)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, model_name, n, seq_len, batch_size, repeats = args.child
        print(json.dumps(child(method, model_name, int(n), int(seq_len), int(batch_size), int(repeats))))
        return 0

    _load(args.model)  # dequantize the embedded model once, outside the timings
    rows = []
    for n in args.sizes:
        methods = ["forward", "forward_metrics", "capture_disk", "capture_disk_3_layers"]
        if n <= args.cache_max_sequences:
            methods.append("run_with_cache_all")
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, args.model, str(n), str(args.seq_len), str(args.batch_size), str(args.repeats)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:<24} n={n:<5} {row['seconds']:8.2f} s  RSS growth {row['rss_growth_mb']:8.0f} MB", flush=True)
    by = {(r["method"], r["n_sequences"]): r for r in rows}
    lines = [
        f"model `{args.model}`, batches of {args.batch_size} x {args.seq_len} tokens, float32, CPU "
        f"(`{Path(sys.executable).name}`), each method in its own process, best of {args.repeats} timed runs",
        "",
        "| method | sequences | tokens | seconds | x plain forward | RSS before run (MB) | peak RSS during run (MB) | growth (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["seconds"] / by[("forward", row["n_sequences"])]["seconds"]
        lines.append(
            f"| {row['method']} | {row['n_sequences']} | {row['n_tokens']} | {row['seconds']:.2f} | "
            f"{ratio:.3f} | {row['rss_before_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['rss_growth_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_capture.md").write_text(table + "\n")
    (args.out / "bench_capture.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                             "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
