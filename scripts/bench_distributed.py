"""Benchmark: capture and probe fit in 1 process vs N processes under torchrun, same cores.

For each configuration ``NxT`` (N processes of T threads; default ``1x2 2x1 1x1``: the 2 cores
used as threads of one process, as two processes, and one core alone for reference) the script
launches ``torchrun --standalone --nproc_per_node N`` on itself (``--worker``) with
``OMP_NUM_THREADS=T``.
Each worker loads the model (not timed), waits at a barrier, then times a capture into a fresh
folder and a probe fit on it (barriers before and after each, so the time is the slowest rank's).
Rank 0 records the times (wall clock of the slowest rank, and CPU seconds summed over ranks: on
a shared machine the wall clock also counts other processes' work) and the capture's content hash (equal across world sizes, or the script
fails). Run real models under the model lock::

    flock /tmp/sp-model.lock python scripts/bench_distributed.py --out /work/runs/G/bench_distributed
    python scripts/bench_distributed.py --model tiny --n-sequences 32 --out /tmp/bench-dist   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _corpus(model, n_sequences: int, seq_len: int) -> list[dict]:
    """``n_sequences`` token-id items of ``seq_len`` tokens cut from the built-in conversations."""
    import numpy as np

    from surprise_probe.core.text.encoding import encode
    from surprise_probe.core.text.files import builtin_items

    stream = np.concatenate(
        [encode(model, item, score_prompt=True, max_tokens=10**9).token_ids for item in builtin_items()]
    )
    need = n_sequences * seq_len
    stream = np.tile(stream, need // len(stream) + 1)[:need]
    return [{"token_ids": stream[i * seq_len : (i + 1) * seq_len].tolist()} for i in range(n_sequences)]


def worker(args) -> None:
    import numpy as np
    import torch
    from surprise_probe.probes import fit_sweep

    import surprise_probe as sp
    from surprise_probe.core.models import distributed
    from surprise_probe.core.utils.jsonio import software_versions, write_json

    torch.set_grad_enabled(False)
    if args.model == "tiny":
        from surprise_probe.testing import tiny_hooked_transformer

        model = tiny_hooked_transformer(n_layers=4, d_model=128, n_ctx=256)
    else:
        model = sp.load_model(args.model, device="cpu", progress=False)
    items = _corpus(model, args.n_sequences, args.seq_len)
    folder = Path(args.out) / f"capture-{distributed.world_size()}x{torch.get_num_threads()}-repeat{args.repeat}"
    if distributed.is_main() and folder.exists():
        shutil.rmtree(folder)
    model(torch.as_tensor([items[0]["token_ids"]] * args.batch_size))  # warm-up (first-call costs), not timed
    distributed.barrier()

    started, started_cpu = time.perf_counter(), time.process_time()
    run = sp.capture(model, items, layers=args.layers, out_dir=folder, batch_size=args.batch_size,
                     shard_size=args.shard_size, progress=False)
    capture_cpu = time.process_time() - started_cpu
    distributed.barrier()
    capture_seconds = time.perf_counter() - started

    started, started_cpu = time.perf_counter(), time.process_time()
    fit_sweep(sp.load_capture(folder), n_folds=5, n_shuffles=5, n_boot=200, progress=False)
    fit_cpu = time.process_time() - started_cpu
    distributed.barrier()
    fit_seconds = time.perf_counter() - started
    # CPU seconds summed over ranks: the work done, whatever else shares the cores.
    capture_cpu, fit_cpu = (float(x[0]) for x in distributed.all_reduce_sum([np.array([capture_cpu]),
                                                                             np.array([fit_cpu])]))
    if distributed.is_main():
        write_json(Path(args.out) / f"{distributed.world_size()}x{torch.get_num_threads()}-repeat{args.repeat}.json", {
            "world_size": distributed.world_size(),
            "threads_per_process": torch.get_num_threads(),
            "capture_seconds": round(capture_seconds, 3),
            "fit_seconds": round(fit_seconds, 3),
            "capture_cpu_seconds": round(capture_cpu, 3),
            "fit_cpu_seconds": round(fit_cpu, 3),
            "content_hash": run.manifest["content_hash"],
            "n_sequences": run.n_sequences,
            "n_tokens": run.n_tokens,
            "hooks": run.hooks,
            "versions": software_versions(),
        })
        shutil.rmtree(folder)  # activations are large; the timing is what is kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name, or 'tiny'")
    parser.add_argument("--n-sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21, 27])
    parser.add_argument("--configs", nargs="+", default=["1x2", "2x1", "1x1"],
                        help="NxT: N processes (torchrun ranks) of T threads each")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every config once")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "tiny" and args.layers == parser.get_default("layers"):
        args.layers = [1, 3]
    if args.worker:
        worker(args)
        return 0

    from surprise_probe.core.utils.jsonio import read_json, write_json

    args.out.mkdir(parents=True, exist_ok=True)
    configs = []
    for spec in args.configs:
        world, _, threads = spec.partition("x")
        if not (world.isdigit() and threads.isdigit() and int(world) > 0 and int(threads) > 0):
            parser.error(f"--configs: {spec!r} is not NxT (e.g. 2x1)")
        configs.append((spec, int(world), int(threads)))
    rows = []
    for repeat in range(args.repeats):
        for spec, world, threads in configs:  # alternate, so drifting load on a shared machine hits all
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(world), __file__, "--worker", "--repeat", str(repeat), "--out", str(args.out),
                       "--model", args.model, "--n-sequences", str(args.n_sequences), "--seq-len",
                       str(args.seq_len), "--batch-size", str(args.batch_size), "--shard-size",
                       str(args.shard_size), "--layers", *map(str, args.layers)]
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            row = read_json(args.out / f"{world}x{threads}-repeat{repeat}.json")
            row["config"] = spec
            row["launch_seconds"] = round(time.perf_counter() - started, 2)
            rows.append(row)
            print(f"{spec} (processes x threads): capture {row['capture_seconds']:.2f} s "
                  f"({row['capture_cpu_seconds']:.2f} CPU s), fit {row['fit_seconds']:.2f} s "
                  f"({row['fit_cpu_seconds']:.2f} CPU s) (launch incl. imports and model load "
                  f"{row['launch_seconds']:.1f} s)", flush=True)
    hashes = {row["content_hash"] for row in rows}
    if len(hashes) != 1:
        raise SystemExit(f"content hashes differ across world sizes: {sorted(hashes)}")
    summary = {}
    for spec, _, _ in configs:
        mine = [row for row in rows if row["config"] == spec]
        summary[spec] = {
            "capture_seconds_best": min(r["capture_seconds"] for r in mine),
            "fit_seconds_best": min(r["fit_seconds"] for r in mine),
            "capture_seconds_all": [r["capture_seconds"] for r in mine],
            "fit_seconds_all": [r["fit_seconds"] for r in mine],
            "capture_cpu_seconds_best": min(r["capture_cpu_seconds"] for r in mine),
            "fit_cpu_seconds_best": min(r["fit_cpu_seconds"] for r in mine),
        }
    write_json(args.out / "bench_distributed.json", {"config": {k: str(v) for k, v in vars(args).items()},
                                                     "content_hash": hashes.pop(), "runs": rows, "summary": summary})
    base = summary[configs[0][0]]
    for spec, _, _ in configs:
        s = summary[spec]
        print(f"{spec}: capture best {s['capture_seconds_best']:.2f} s "
              f"(x{base['capture_seconds_best'] / s['capture_seconds_best']:.2f}), fit best {s['fit_seconds_best']:.2f} s "
              f"(x{base['fit_seconds_best'] / s['fit_seconds_best']:.2f}); CPU seconds summed over ranks: capture "
              f"{s['capture_cpu_seconds_best']:.2f}, fit {s['fit_cpu_seconds_best']:.2f}")
    print(f"wrote {args.out / 'bench_distributed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
