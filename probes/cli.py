"""``surprise-probe fit``: ridge probes at every captured hook, with controls, from a capture folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

__all__ = ["add_fit_command", "run_fit", "write_fit_outputs"]


def add_fit_command(subparsers) -> argparse.ArgumentParser:
    """Register ``fit`` on the ``surprise-probe`` sub-command parser."""
    parser = subparsers.add_parser(
        "fit",
        help="fit linear probes for input surprise / entropy at every captured hook, with controls",
        description=(
            "Ridge probes from one streamed pass over a capture folder: every hook, every alpha, "
            "k-fold CV grouped by sequence, bootstrap CIs over sequences, token-identity and "
            "shuffled-label controls. Writes sweep.csv, sweep.json, sweep.html, heldout.npz and "
            "the best probe direction (probe.npz + probe.json)."
        ),
    )
    parser.add_argument(
        "--activations",
        required=True,
        type=Path,
        help="capture folder (surprise-probe capture --out)",
    )
    parser.add_argument(
        "--target",
        default="surprise",
        help="'surprise' (input surprise, default), 'entropy' (output entropy), or a .npy/.npz file of "
        "per-token values keyed by (sequence_id, position) (see docs/probes.md)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--hooks", nargs="+", help="hooks to fit (default: every captured hook)")
    parser.add_argument(
        "--alphas", nargs="+", type=float, help="ridge alphas (default: 17 values, 1e-2..1e6)"
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="CV folds, grouped by sequence (default 5)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for folds, shuffles and bootstrap"
    )
    parser.add_argument(
        "--shuffles", type=int, default=20, help="shuffled-label controls (default 20)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of sequences"
    )
    parser.add_argument(
        "--no-nested",
        action="store_true",
        help="choose alpha on the outer folds (faster, optimistic)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_fit)
    return parser


def write_fit_outputs(result, out: Path, config: dict | None = None) -> dict[str, Path]:
    """Write the sweep table, JSON, HTML plot, held-out predictions and best direction to ``out``."""
    from surprise_probe.probes.plots import alpha_curve_figure, layer_sweep_figure

    from surprise_probe.jsonio import to_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": result.write_csv(out / "sweep.csv"),
        "html": out / "sweep.html",
        "alphas_html": out / "alphas.html",
        "heldout": out / "heldout.npz",
        "json": out / "sweep.json",
    }
    layer_sweep_figure(result).write_html(paths["html"], include_plotlyjs=True)
    alpha_curve_figure(result).write_html(paths["alphas_html"], include_plotlyjs=True)
    np.savez_compressed(
        paths["heldout"], **{k.replace(":", "__"): v for k, v in result.predictions.items()}
    )
    direction = result.direction()
    paths["probe"] = direction.save(out / "probe")
    payload = result.to_dict()
    payload["command_config"] = config or {}
    payload["best_probe"] = str(out / "probe")
    paths["json"].write_text(to_json(payload))
    return paths


def run_fit(args) -> int:
    """Handler of ``surprise-probe fit``."""
    from surprise_probe.probes.sweep import fit_sweep

    from surprise_probe import load_capture

    started = time.perf_counter()
    run = load_capture(args.activations)
    result = fit_sweep(
        run,
        args.target,
        hooks=args.hooks,
        alphas=args.alphas,
        n_folds=args.folds,
        seed=args.seed,
        n_shuffles=args.shuffles,
        n_boot=args.bootstrap,
        nested=not args.no_nested,
        progress=not args.no_progress,
    )
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    config["elapsed_seconds"] = round(time.perf_counter() - started, 2)
    paths = write_fit_outputs(result, args.out, config)
    controls = result.controls
    best = result[result.best_hook()]
    print(f"\n{run}")
    print(f"target: {result.target} on {result.n_tokens} tokens in {result.n_sequences} sequences")
    print(result.to_markdown())
    print(f"\ntoken-identity mean R^2: {controls['token_mean_r2']}")
    if controls.get("embedding_r2") is not None:
        print(f"embedding-layer probe R^2: {controls['embedding_r2']}")
    if controls.get("surprise_entropy_r") is not None:
        print(f"Pearson r(input surprise, output entropy): {controls['surprise_entropy_r']}")
    print(f"best hook: {best.hook} (R^2 {best.r2}, shuffle p {best.shuffle_p:.3f})")
    print(
        f"\nwrote {paths['csv']}, {paths['json']}, {paths['html']}, {paths['probe']} "
        f"in {config['elapsed_seconds']} s"
    )
    return 0
