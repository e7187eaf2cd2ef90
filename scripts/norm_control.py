"""Surprise or the norm? Run ``interventions.norm_control`` on a model (issue #27).

Fits the surprise and entropy probes at one layer on the built-in conversations (as the study's
fit stages do, without shuffles or nested CV, so in about two CPU minutes on the embedded model),
or loads saved ones, then runs the controls and writes ``norm_control.json`` / ``.html`` and the
probes into ``--out``.

    python scripts/norm_control.py --out runs/norm_control                     # 10 built-in conversations
    python scripts/norm_control.py --out runs/norm_control_texts --inputs texts  # 10 short plain texts
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from surprise_probe.interventions import norm_control
from surprise_probe.probes import ProbeDirection, fit_sweep

import surprise_probe as sp
from surprise_probe.core.forward.hooks import resid_post
from surprise_probe.core.text.files import builtin_items

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She opened the letter and found a photograph of her grandmother.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting was postponed because the manager was stuck in traffic.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "He planted tomatoes in the garden, but the rabbits ate every one.",
    "To make tea, pour hot water over the leaves and wait three minutes.",
    "The violin screamed like a purple elephant in the library at midnight.",
    "Our results suggest that the protein folds faster at lower temperatures.",
    "After the storm, the streets were quiet and the sky turned orange.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=17)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--inputs", choices=("builtin", "texts"), default="builtin")
    parser.add_argument("--n-inputs", type=int, default=10)
    parser.add_argument("--probe", type=Path, help="a saved surprise ProbeDirection (default: fit one)")
    parser.add_argument("--entropy-probe", type=Path, help="a saved entropy ProbeDirection (default: fit one)")
    parser.add_argument("--random", type=int, default=10, help="random directions")
    parser.add_argument("--random-neurons", type=int, default=5, help="random neuron sets (the study's default)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[-4.0, 0.0, 4.0],
                        help="steering strengths in std of the projection (the study's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.time()
    model = sp.load_model(args.model)
    conversations = [{"messages": item["messages"]} for item in builtin_items()]
    hook = resid_post(args.layer)
    probes = {}
    if args.probe is None or args.entropy_probe is None:
        run = sp.capture(model, conversations, hooks=[hook], progress=False)
        for target in ("surprise", "entropy"):
            sweep = fit_sweep(run, target, hooks=[hook], n_shuffles=0, nested=False, n_boot=200, progress=False)
            probes[target] = sweep.direction(hook)
            probes[target].save(args.out / f"{target}_probe")
    for target, path in (("surprise", args.probe), ("entropy", args.entropy_probe)):
        if path is not None:
            probes[target] = ProbeDirection.load(path, model=model)
    inputs = (conversations if args.inputs == "builtin" else TEXTS)[: args.n_inputs]
    result = norm_control(model, probes["surprise"], inputs, entropy_direction=probes["entropy"],
                          strengths=args.strengths, n_random=args.random, n_random_neurons=args.random_neurons,
                          seed=args.seed)
    result.save(args.out)
    print(result.summary())
    print(f"{time.time() - start:.0f} s; wrote {args.out}/norm_control.json and norm_control.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
