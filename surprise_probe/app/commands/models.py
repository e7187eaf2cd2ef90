"""``surprise-probe models``: what loads offline here, and what is cached."""

from __future__ import annotations

from pathlib import Path

from surprise_probe.app.commands._common import add_command
from surprise_probe.core.models.loading import available_models
from surprise_probe.core.utils.jsonio import to_json

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "models", help="list the models that can be loaded offline, and what is cached")
    parser.add_argument("--json", action="store_true", help="print only JSON (one list of objects)")
    parser.set_defaults(func=run)


def run(args) -> int:
    rows = available_models()
    if args.json:
        print(to_json(rows))
        return 0
    print(f"{'name':<24} {'kind':<13} {'installed':<10} {'cached':<7} description")
    for row in rows:
        print(f"{row['name']:<24} {row['kind']:<13} {str(row['installed']):<10} {str(row['cached']):<7} "
              f"{row['description']}")
    print(
        "\nAlso accepted: a local Hugging Face folder, or a Hugging Face / TransformerLens name already in "
        "the local hub cache (no downloads at run time).\nCache folder: " + str(Path(rows[0]["cache_folder"]).parent)
    )
    return 0
