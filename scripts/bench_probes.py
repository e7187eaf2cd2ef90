"""Benchmark: ridge probes for all hooks x all alphas from streamed statistics vs scikit-learn.

Compares, on the same tokens, the same grouped folds and the same alpha grid:

- ``probes.fit_sweep`` (one pass over the shards; nested and plain alpha selection);
- scikit-learn per hook: ``GridSearchCV(StandardScaler + Ridge)`` over the alphas with the same
  folds, i.e. ``RidgeCV(alphas, cv=folds)`` with the features standardised inside each training
  fold as ``fit_sweep`` does (``RidgeCV`` alone cannot standardise per fold);
- the capture that produced the activations (``elapsed_seconds_this_session`` from the capture
  manifest, or a capture timed here when no ``--activations`` folder is given).

Same-result checks: the pooled held-out squared error at every alpha, the chosen alpha and the
all-token refit coefficients. Prints a markdown table and writes ``bench.md`` + ``bench.json``.

    python scripts/bench_probes.py --out runs/bench                       # tiny model, offline
    python scripts/bench_probes.py --activations runs/capture --out runs/bench --sklearn-hooks 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def _capture_tiny(out: Path, n_texts: int, n_layers: int, d_model: int):
    import surprise_probe as sp
    from surprise_probe.testing import TINY_CORPUS, tiny_hooked_transformer

    model = tiny_hooked_transformer(n_layers=n_layers, d_model=d_model, n_ctx=128)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(TINY_CORPUS, size=3)) for _ in range(n_texts)]
    started = time.perf_counter()
    run = sp.capture(
        model, texts, out_dir=out / "capture", overwrite=True, shard_size=32, progress=False
    )
    return run, time.perf_counter() - started, "timed here"


def _sklearn_hook(run, hook: str, data, folds: np.ndarray, alphas: np.ndarray):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    # float64 like fit_sweep's statistics (float32 activations would make sklearn solve in float32)
    X = np.concatenate(
        [
            np.asarray(shard.activations(hook)[mask], dtype=np.float64)
            for shard, mask in zip(run.shards(), data.masks, strict=False)
        ]
    )
    loaded = time.perf_counter()
    splits = [
        (np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(folds.max() + 1)
    ]
    search = GridSearchCV(
        make_pipeline(StandardScaler(), Ridge()),
        {"ridge__alpha": list(alphas)},
        cv=splits,
        scoring="neg_mean_squared_error",
        refit=True,
    ).fit(X, data.y)
    finished = time.perf_counter()
    sizes = np.array([len(test) for _, test in splits])
    pooled_sse = np.array(
        [
            -sum(
                search.cv_results_[f"split{f}_test_score"][a] * sizes[f] for f in range(len(splits))
            )
            for a in range(len(alphas))
        ]
    )
    scaler, ridge = search.best_estimator_[0], search.best_estimator_[1]
    return {
        "load_seconds": loaded - started,
        "fit_seconds": finished - loaded,
        "alpha": float(search.best_params_["ridge__alpha"]),
        "pooled_sse": pooled_sse,
        "coef": ridge.coef_ / scaler.scale_,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (bench.md, bench.json)"
    )
    parser.add_argument(
        "--activations", type=Path, help="capture folder (default: capture a tiny model here)"
    )
    parser.add_argument("--texts", type=int, default=300, help="texts for the tiny-model capture")
    parser.add_argument("--layers", type=int, default=6, help="layers of the tiny model")
    parser.add_argument("--d-model", type=int, default=128, help="width of the tiny model")
    parser.add_argument(
        "--alphas", nargs="+", type=float, help="ridge alphas (default: probes.DEFAULT_ALPHAS)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=2, help="time fit_sweep this many times, report the best"
    )
    parser.add_argument(
        "--sklearn-hooks",
        type=int,
        default=None,
        help="compare scikit-learn on the first N hooks only and extrapolate its time (default: all)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads for the fits (default 1: spin-waiting BLAS threads distort timings whenever "
        "other processes share the CPU; 0 = library default); the capture is never limited",
    )
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    import surprise_probe as sp

    args.out.mkdir(parents=True, exist_ok=True)
    if args.activations is None:  # timed without BLAS limits: torch runs as it normally would
        run, capture_seconds, capture_source = _capture_tiny(
            args.out, args.texts, args.layers, args.d_model
        )
    else:
        run = sp.load_capture(args.activations)
        capture_seconds = run.manifest.get("elapsed_seconds_this_session")
        capture_source = "capture manifest (elapsed_seconds_this_session)"
    if args.blas_threads:
        with threadpool_limits(args.blas_threads, user_api="blas"):
            return _bench(args, run, capture_seconds, capture_source)
    return _bench(args, run, capture_seconds, capture_source)


def _bench(args, run, capture_seconds, capture_source) -> int:
    from surprise_probe.probes import DEFAULT_ALPHAS, assign_folds, fit_sweep, select_target

    alphas = np.sort(np.asarray(args.alphas or DEFAULT_ALPHAS, dtype=float))
    hooks = run.hooks

    timings = {}
    results = {}
    for name, nested in (
        ("probes.fit_sweep (nested alpha, default)", True),
        ("probes.fit_sweep (plain k-fold alpha)", False),
    ):
        best = float("inf")
        for _ in range(args.repeats):  # best of a few: other processes share the CPU
            started = time.perf_counter()
            results[nested] = fit_sweep(
                run, alphas=alphas, n_folds=args.folds, nested=nested, n_shuffles=20, progress=False
            )
            best = min(best, time.perf_counter() - started)
        timings[name] = best
    plain = results[False]

    data = select_target(run, "surprise")
    folds = assign_folds(data.sequence_ids, args.folds, seed=0)
    compared = hooks[: args.sklearn_hooks] if args.sklearn_hooks else hooks
    checks, sk_load, sk_fit = [], 0.0, 0.0
    for hook in compared:
        reference = _sklearn_hook(run, hook, data, folds, alphas)
        sk_load += reference["load_seconds"]
        sk_fit += reference["fit_seconds"]
        ours = plain[hook]
        sst = np.sum((data.y - data.y.mean()) ** 2)
        our_sse = (1 - np.asarray(ours.cv_r2_by_alpha)) * sst
        checks.append(
            {
                "hook": hook,
                "alpha_probes": ours.alpha,
                "alpha_sklearn": reference["alpha"],
                "cv_sse_max_rel_diff": float(
                    np.max(np.abs(our_sse - reference["pooled_sse"]) / reference["pooled_sse"])
                ),
                "coef_rel_diff": float(
                    np.max(np.abs(ours.coef - reference["coef"]))
                    / np.max(np.abs(reference["coef"]))
                ),
            }
        )
    scale = len(hooks) / len(compared)
    sklearn_total = (sk_load + sk_fit) * scale
    sklearn_name = "sklearn GridSearchCV(StandardScaler+Ridge) per hook" + (
        f" (measured on {len(compared)} hooks, x{scale:.1f})" if scale != 1 else ""
    )
    timings[sklearn_name] = sklearn_total

    d_model = run.d_model
    lines = [
        f"Probe benchmark: {run.model_id}, {len(hooks)} hooks, d_model {d_model}, {data.n_tokens} tokens "
        f"({data.n_sequences} sequences), {len(alphas)} alphas, {args.folds} grouped folds, target input surprise. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"BLAS threads: {args.blas_threads or 'library default'}.",
        "",
        "| method | seconds | vs capture | vs sklearn |",
        "|---|---:|---:|---:|",
    ]
    if capture_seconds is not None:
        lines.append(
            f"| capture that produced the data ({capture_source}) | {capture_seconds:.2f} | 1.00 | |"
        )
    for name, seconds in timings.items():
        vs_capture = f"{seconds / capture_seconds:.2f}" if capture_seconds else "n/a"
        lines.append(f"| {name} | {seconds:.2f} | {vs_capture} | {seconds / sklearn_total:.3f} |")
    lines += [
        "",
        f"scikit-learn time: {sk_load * scale:.2f} s loading activations + {sk_fit * scale:.2f} s fitting. "
        "fit_sweep times include reading the shards, 20 shuffled-label controls, the token-identity "
        "control and bootstrap CIs.",
        "",
        "Same-result check (plain k-fold alpha selection vs scikit-learn, same folds):",
        "",
        "| hook | alpha (probes) | alpha (sklearn) | max rel. diff of held-out SSE over alphas | rel. diff of refit coef |",
        "|---|---:|---:|---:|---:|",
    ]
    for check in checks:
        lines.append(
            f"| {check['hook']} | {check['alpha_probes']:.3g} | {check['alpha_sklearn']:.3g} | "
            f"{check['cv_sse_max_rel_diff']:.2e} | {check['coef_rel_diff']:.2e} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "bench.md").write_text(table + "\n")
    (args.out / "bench.json").write_text(
        json.dumps(
            {
                "model_id": run.model_id,
                "hooks": hooks,
                "d_model": d_model,
                "n_tokens": data.n_tokens,
                "n_sequences": data.n_sequences,
                "alphas": alphas.tolist(),
                "folds": args.folds,
                "capture_seconds": capture_seconds,
                "capture_source": capture_source,
                "timings": timings,
                "sklearn_hooks_measured": len(compared),
                "checks": checks,
            },
            indent=2,
        )
    )
    worst = max((c["cv_sse_max_rel_diff"] for c in checks), default=0.0)
    if worst > 1e-6 or any(c["alpha_probes"] != c["alpha_sklearn"] for c in checks):
        print(f"\nWARNING: results differ from scikit-learn (max rel. diff {worst:.2e})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
