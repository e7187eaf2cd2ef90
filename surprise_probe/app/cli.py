"""``surprise-probe <command>``: the top of the import graph (nothing in the package imports it).

Each command lives in ``surprise_probe/app/commands/<name>.py`` (``add_parser`` + ``run``); this module
registers them with static imports and applies the one error policy (``commands._common.run_main``).
"""

from __future__ import annotations

import sys

from surprise_probe import __version__
from surprise_probe.app.commands import (
    capture,
    fit,
    gap,
    generate,
    intention,
    models,
    patch,
    steer,
    study,
)
from surprise_probe.app.commands._common import Parser, positive_int, run_main
from surprise_probe.core.utils.threads import configure_threads

__all__ = ["main", "build_parser"]

COMMANDS = (models, capture, generate, fit, steer, patch, gap, intention, study)


def build_parser() -> tuple[Parser, dict]:
    """The top parser and its sub-command parsers by name."""
    parser = Parser(
        prog="surprise-probe",
        description="Input surprise and output entropy in TransformerLens models: capture, probes, interventions.",
    )
    parser.add_argument("--version", action="version", version=f"surprise-probe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: $SURPRISE_PROBE_THREADS, else the CPUs this process may use: "
                             "its affinity and cgroup quota)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser, dict(subparsers.choices)


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    return run_main(parser, commands, argv, before=lambda args: configure_threads(args.threads))


if __name__ == "__main__":
    sys.exit(main())
