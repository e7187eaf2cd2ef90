"""``surprise-probe steer`` and ``surprise-probe patch``: JSON (config + results) and offline HTML.

Wired into ``surprise_probe.cli`` via :func:`add_steer_command` and :func:`add_patch_command`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["add_steer_command", "add_patch_command", "run_steer", "run_patch", "read_pairs"]

DEFAULT_ALPHAS = [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0]


def _load_model(name: str, device: str):
    from surprise_probe.models import load_model

    return load_model(name, device=device)


def _load_probe(path: str | Path, model):
    from surprise_probe.probes import ProbeDirection

    return ProbeDirection.load(path, model=model)


def _config(args) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items() if key != "func"}


def _write_json(path: Path, payload: dict) -> None:
    from surprise_probe.jsonio import write_json

    write_json(path, payload)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF folder or cached hub name")
    parser.add_argument("--probe", required=True, help="probe direction file (probes.ProbeDirection.save)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (JSON + HTML)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (bounds memory)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (over sequences / pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_steer_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "steer", help="dose-response of steering along a probe direction, ablation, steered samples",
        description="Sweep alpha (in std of the probe projection) along the probe direction and "
                    "random controls; measure entropy, KL from clean and top-1 agreement over the "
                    "scored span; project the direction out; optionally sample steered text.",
    )
    _common(parser)
    parser.add_argument("--input", default="builtin",
                        help=".jsonl (text / messages / token_ids per line), .txt, or 'builtin'")
    parser.add_argument("--alphas", type=float, nargs="+", default=DEFAULT_ALPHAS,
                        help="steering strengths in std units of the probe projection")
    parser.add_argument("--random-directions", type=int, default=8, help="random control directions (k)")
    parser.add_argument("--positions", choices=["response", "all"], default="response",
                        help="edit the scored span (assistant response) only, or every token")
    parser.add_argument("--hook", default=None, help="hook to steer at (default: the probe's hook)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the directional ablation")
    parser.add_argument("--loop", action="store_true", help="run one alpha at a time (reference; slower)")
    parser.add_argument("--samples", type=int, default=0,
                        help="sample steered text for the first N inputs at the lowest, zero and highest alpha")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--truncate", action="store_true", help="cut inputs longer than the model context")
    parser.set_defaults(func=run_steer)
    return parser


def add_patch_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "patch", help="activation patching between paired runs along a probe direction",
        description="For each layer x position group, patch the source run's activation (the component "
                    "along the probe direction, and the whole activation) into the destination run and "
                    "report the fraction of the entropy gap closed.",
    )
    _common(parser)
    parser.add_argument("--pairs", required=True, help='.jsonl of {"source": item, "destination": item}')
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layers to patch (default: all)")
    parser.add_argument("--groups", nargs="+", default=["prompt", "response", "first4"],
                        help="position groups: prompt, response, first<K>")
    parser.add_argument("--components", nargs="+", choices=["direction", "all"], default=["direction", "all"])
    parser.set_defaults(func=run_patch)
    return parser


def _read_items(spec: str) -> list:
    from surprise_probe.io import builtin_items, read_inputs

    return builtin_items() if spec == "builtin" else read_inputs(Path(spec))


def read_pairs(path: str | Path) -> list[tuple]:
    """Read ``{"source": item, "destination": item}`` lines; items as in ``--input`` files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict) or "source" not in value or "destination" not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{path}:{number}: expected an object with 'source' and 'destination', got {keys}")
        pairs.append((value["source"], value["destination"]))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def run_steer(args, model=None) -> int:
    from surprise_probe.interventions.directions import SteeringDirection, from_probe
    from surprise_probe.interventions.dose_response import directional_ablation, dose_response
    from surprise_probe.interventions.generation import generate
    from surprise_probe.interventions.hooks import Steer
    from surprise_probe.interventions.plots import ablation_figure, dose_response_figure, write_html

    from surprise_probe.inputs import encode_all
    from surprise_probe.models import model_id

    started = time.perf_counter()
    progress = not args.no_progress
    model = model if model is not None else _load_model(args.model, args.device)
    direction = from_probe(model, _load_probe(args.probe, model), hook=args.hook)
    items = _read_items(args.input)
    encoded = encode_all(model, items, truncate=args.truncate)
    print(f"[steer] {model_id(model)}: {len(encoded)} inputs, hook {direction.hook}, std {direction.std:.4g}, "
          f"alphas {args.alphas}, {args.random_directions} random directions")
    result = dose_response(
        model, encoded, direction, args.alphas, random_directions=args.random_directions,
        positions=args.positions, batch_size=args.batch_size, batched=not args.loop, seed=args.seed,
        n_boot=args.n_boot, progress=progress,
    )
    low, high = result.probe_slope_ci
    print(f"entropy slope {result.probe_slope:.4g} nats/std [{low:.4g}, {high:.4g}] "
          f"(random {result.random_slope_mean:.4g} +/- {result.random_slope_std:.4g}; z = {result.z_score:.2f}) "
          f"over {result.n_tokens} scored tokens in {result.n_sequences} sequences")
    out = Path(args.out)
    payload = {"command": "steer", "config": _config(args), "model_id": model_id(model),
               "dose_response": result.to_dict()}
    write_html(dose_response_figure(result), out / "dose_response.html")
    if not args.no_ablation:
        ablation = directional_ablation(
            model, encoded, direction, random_directions=args.random_directions, positions=args.positions,
            batch_size=args.batch_size, seed=args.seed, n_boot=args.n_boot, progress=progress,
        )
        print(f"ablation: entropy change {ablation.entropy_change[0]:.4g} nats "
              f"(random {ablation.random_change_mean:.4g} +/- {ablation.random_change_std:.4g}; z = {ablation.z_score:.2f})")
        payload["ablation"] = ablation.to_dict()
        write_html(ablation_figure(ablation), out / "ablation.html")
    if args.samples:
        payload["samples"] = _steered_samples(model, items[: args.samples], direction, args, generate, Steer,
                                              SteeringDirection)
    payload["elapsed_seconds"] = round(time.perf_counter() - started, 2)
    _write_json(out / "steer.json", payload)
    print(f"wrote {out / 'steer.json'}, {out / 'dose_response.html'}"
          + ("" if args.no_ablation else f", {out / 'ablation.html'}"))
    return 0


def _steered_samples(model, items, direction, args, generate, Steer, SteeringDirection) -> list[dict]:
    alphas = sorted({min(args.alphas), 0.0, max(args.alphas)})
    rows = []
    for index, item in enumerate(items):
        for alpha in alphas:
            steer = Steer(hooks=direction.hook, direction=direction.direction, alpha=alpha, scale=direction.std)
            sample = generate(model, item, steer, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed + index)[0]
            rows.append({"input": index, "alpha": alpha, "seed": sample.seed, "prompt": sample.prompt,
                         "text": sample.text, "token_ids": sample.token_ids})
            print(f"[input {index}, alpha {alpha:+g}] {sample.text!r}")
    return rows


def run_patch(args, model=None) -> int:
    from surprise_probe.interventions.directions import from_probe
    from surprise_probe.interventions.hooks import resid_hooks
    from surprise_probe.interventions.patching import activation_patching
    from surprise_probe.interventions.plots import patching_figure, write_html

    from surprise_probe.models import model_id

    started = time.perf_counter()
    model = model if model is not None else _load_model(args.model, args.device)
    direction = from_probe(model, _load_probe(args.probe, model))
    pairs = read_pairs(args.pairs)
    layers = list(range(int(model.cfg.n_layers))) if args.layers is None else args.layers
    hooks = resid_hooks(model, layers)
    print(f"[patch] {model_id(model)}: {len(pairs)} pairs, {len(hooks)} layers, groups {args.groups}")
    result = activation_patching(
        model, pairs, hooks=hooks, groups=args.groups, direction=direction, components=args.components,
        batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed, progress=not args.no_progress,
    )
    print(f"mean entropy over the measured span: source {result.entropy_source:.4f}, "
          f"destination {result.entropy_destination:.4f} nats ({result.n_measured_tokens} tokens)")
    for component in result.components:
        print(f"fraction of the gap closed ({component}):")
        print(f"  {'hook':<28}" + "".join(f"{g:>10}" for g in result.groups))
        for hook, row in zip(result.hooks, result.fraction[component], strict=False):
            print(f"  {hook:<28}" + "".join(f"{v:10.3f}" for v in row))
    out = Path(args.out)
    write_html(patching_figure(result), out / "patching.html")
    _write_json(out / "patch.json", {
        "command": "patch", "config": _config(args), "model_id": model_id(model), "patching": result.to_dict(),
        "elapsed_seconds": round(time.perf_counter() - started, 2),
    })
    print(f"wrote {out / 'patch.json'}, {out / 'patching.html'}")
    return 0
