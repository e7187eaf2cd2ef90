"""``surprise-probe study``: the main job on one model, end to end, into one output folder.

Steps (a finished step is skipped on rerun, so an interrupted study resumes):

1. ``capture/``: read the inputs (default: the built-in conversations, human-written answers)
   and record every layer's residual stream, input surprise and output entropy;
2. ``fit_surprise/``, ``fit_entropy/``: ridge probes at every layer, with controls;
3. ``steer/``: add the best surprise direction at its layer, sweep alpha, compare with random
   directions, and ablate it;
4. ``index.html``: links to every figure and a token view of one conversation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_study_command", "run_study"]


def add_study_command(commands) -> None:
    study = commands.add_parser("study", help="the main job: capture -> probes -> steering on one model")
    study.add_argument("--model", default="smollm2-135m-instruct")
    study.add_argument("--input", default="builtin", help="inputs to read (default: the built-in conversations)")
    study.add_argument("--out", type=Path, default=Path("runs/study"))
    study.add_argument("--batch-size", type=int, default=8)
    study.add_argument("--steer-inputs", type=int, default=8, help="conversations used for the steering sweep")
    study.add_argument("--alphas", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0, 4.0],
                       help="steering strengths in units of the probe projection's std")
    study.add_argument("--random-directions", type=int, default=4)
    study.add_argument("--overwrite", action="store_true")
    study.add_argument("--device", default="cpu")
    study.set_defaults(func=run_study)


def _run(argv: list[str], **kwargs) -> None:
    from surprise_probe.cli import build_parser

    args = build_parser().parse_args(argv)
    code = args.func(args, **kwargs) if kwargs else args.func(args)
    if code:
        raise RuntimeError(f"step `surprise-probe {' '.join(argv)}` failed with exit code {code}")


def run_study(args) -> int:
    import shutil

    from surprise_probe.io import read_inputs
    from surprise_probe.models import load_model

    out = Path(args.out)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    print(f"== 1/4 capture: {args.model} reads {args.input}")
    t = time.perf_counter()
    _run(["capture", "--model", args.model, "--input", args.input, "--out", str(out / "capture"),
          "--batch-size", str(args.batch_size), "--device", args.device])
    timings["capture"] = time.perf_counter() - t

    for target in ("surprise", "entropy"):
        folder = out / f"fit_{target}"
        print(f"\n== 2/4 probes for {target} -> {folder}")
        t = time.perf_counter()
        if (folder / "sweep.json").exists():
            print("   (done already; skipped)")
        else:
            _run(["fit", "--activations", str(out / "capture"), "--target", target, "--out", str(folder)])
        timings[f"fit_{target}"] = time.perf_counter() - t

    if args.input == "builtin":
        from surprise_probe.io import builtin_items

        items = builtin_items()
    else:
        items = read_inputs(args.input, keep_metadata=True)
    steer_dir = out / "steer"
    print(f"\n== 3/4 steering along the best surprise direction -> {steer_dir}")
    t = time.perf_counter()
    if (steer_dir / "steer.json").exists():
        print("   (done already; skipped)")
    else:
        inputs = out / "steer_inputs.jsonl"
        with open(inputs, "w") as handle:
            for item in items[: args.steer_inputs]:
                handle.write(json.dumps(item) + "\n")
        model = load_model(args.model, device=args.device, progress=False)
        _run(["steer", "--model", args.model, "--probe", str(out / "fit_surprise" / "probe"),
              "--input", str(inputs), "--out", str(steer_dir),
              "--random-directions", str(args.random_directions),
              "--alphas", *[str(a) for a in args.alphas]], model=model)
    timings["steer"] = time.perf_counter() - t

    print(f"\n== 4/4 report -> {out / 'index.html'}")
    _write_index(out, args, items[0])
    timings["total"] = time.perf_counter() - started
    (out / "study.json").write_text(json.dumps(
        {"config": {k: str(v) for k, v in vars(args).items() if k != "func"},
         "seconds": {k: round(v, 1) for k, v in timings.items()}}, indent=2))
    print(f"\nstudy done in {timings['total']:.0f} s; open {out / 'index.html'}")
    return 0


def _write_index(out: Path, args, example) -> None:
    from surprise_probe.capture import token_metrics
    from surprise_probe.models import load_model
    from surprise_probe.plots import token_view, write_html

    model = load_model(args.model, device=args.device, progress=False)
    m = token_metrics(model, example)
    first = max(0, int(m.scored.argmax()) - 8)
    sl = slice(first, first + 96)
    write_html(token_view(m.tokens[sl], m.input_surprise[sl], m.output_entropy[sl], m.scored[sl],
                          title=f"{args.model} reading input 0 of {args.input}"),
               out / "token_view.html")
    links = [
        ("token_view.html", "Token view: per-token input surprise and output entropy of one conversation"),
        ("fit_surprise/sweep.html", "Layer sweep: decoding input surprise, with controls"),
        ("fit_entropy/sweep.html", "Layer sweep: decoding output entropy, with controls"),
        ("steer/dose_response.html", "Dose-response: steering along the surprise direction vs random directions"),
        ("steer/ablation.html", "Directional ablation: projecting the surprise direction out vs random directions"),
    ]
    items = "\n".join(
        f"<li><a href='{href}'>{text}</a></li>" for href, text in links if (out / href).exists()
    )
    (out / "index.html").write_text(
        f"<html><head><meta charset='utf-8'><title>surprise-probe study: {args.model}</title></head>"
        f"<body style='font-family: sans-serif'><h1>surprise-probe study: {args.model}</h1>"
        f"<p>Inputs: {args.input}. Numbers and their controls: the JSON files in each folder.</p>"
        f"<ul>{items}</ul></body></html>"
    )
