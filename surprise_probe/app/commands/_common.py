"""What every command shares: the parser class, argument types, model arguments, ``--config``,
and the one error policy of :func:`main`.

Error policy: a usage error (bad flag or value, missing or malformed input file, an ``--out``
that cannot be used) exits 2; a runtime error exits 1; both print exactly one line on stderr,
``surprise-probe <command>: error: <what was wrong and what was expected>``. ``--debug`` adds
the traceback. Usage errors are found before any model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from surprise_probe.core.models import distributed
from surprise_probe.core.models.devices import DTYPES, resolve_device
from surprise_probe.core.models.loading import (
    DEFAULT_MODEL,
    chat_template_available,
    check_model_name,
    load_model,
    model_layer_count,
)
from surprise_probe.core.utils.jsonio import finite_or_none, read_json
from surprise_probe.core.utils.outputs import check_writable_target, claim_output

__all__ = [
    "claim_on_main",
    "finished_everywhere",
    "UsageError",
    "Parser",
    "add_command",
    "add_model_arguments",
    "add_out_argument",
    "usage_errors",
    "command_config",
    "check_model_arguments",
    "check_chat_templates",
    "positive_int",
    "input_spec",
    "nonneg_int",
    "finite_float",
    "nonneg_float",
    "positive_float",
    "run_main",
]

# Settings that do not belong in a rerunnable record (actions and presentation, not settings).
NOT_SETTINGS = {"func", "command", "config", "debug", "overwrite", "no_progress", "allow_download",
                "allow_unverified_probe", "threads"}


class UsageError(Exception):
    """A bad argument or input, found before any work: exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become one line (via :class:`UsageError`), not usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def add_argument(self, *args, **kwargs):
        # Help shows every default, so an option without a help text still gets a line.
        if "help" not in kwargs and args and str(args[0]).startswith("--"):
            kwargs["help"] = str(args[0])[2:].replace("-", " ")
        return super().add_argument(*args, **kwargs)


def _type(name: str, check: Callable[[float], bool], expected: str, cast=int):
    def convert(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


positive_int = _type("positive_int", lambda v: v >= 1, "an integer >= 1")
nonneg_int = _type("nonneg_int", lambda v: v >= 0, "an integer >= 0")
finite_float = _type("finite_float", math.isfinite, "a finite number", float)
nonneg_float = _type("nonneg_float", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", float)
positive_float = _type("positive_float", lambda v: math.isfinite(v) and v > 0, "a finite number > 0", float)
level_float = _type("level_float", lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)", float)


def input_spec(text: str) -> str:
    """``builtin`` or a path, normalised (``./a.txt`` and ``a.txt`` are one setting)."""
    return text if text == "builtin" else str(Path(text))


def add_command(subparsers, name: str, help: str, description: str | None = None) -> Parser:
    """A sub-command parser whose help shows defaults, with ``--config`` and ``--debug``."""
    parser = subparsers.add_parser(
        name, help=help, description=description or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="rerun with the settings recorded in an output's config.json; flags given "
                             "on the command line override them")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str = DEFAULT_MODEL) -> None:
    """``--model``, ``--device`` and ``--dtype``, shared by every command that loads a model."""
    parser.add_argument("--model", default=default,
                        help="embedded name (see `surprise-probe models`), local Hugging Face folder, "
                             "or a name in the local hub cache")
    parser.add_argument("--device", default="auto", help="'auto' (a GPU if visible, else CPU), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="the model's weights and activations (metrics are computed in float32 or better)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let a Hugging Face name not in the local hub cache download (off: nothing is fetched)")


def add_out_argument(parser: argparse.ArgumentParser, what: str, *, required: bool = True, default=None) -> None:
    """``--out`` and ``--overwrite``."""
    parser.add_argument("--out", type=Path, required=required, default=default, help=what)
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute when --out holds this command's earlier result with other settings "
                             "(files surprise-probe did not write are never deleted)")


def load_model_from_args(args, progress: bool = True):
    """The model named by ``--model`` / ``--device`` / ``--dtype``."""
    return load_model(args.model, device=args.device, dtype=args.dtype, progress=progress,
                      allow_download=bool(getattr(args, "allow_download", False)))


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside this block, bad inputs (``ValueError``, missing files, refused outputs) are usage errors."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError) as error:
        raise UsageError(_message(error)) from error


def check_out(path: Path, is_file: bool = False) -> None:
    """Refuse an ``--out`` of the wrong kind or in a place that cannot be written (usage error)."""
    try:
        check_writable_target(Path(path), is_file)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_model_arguments(args) -> None:
    """Refuse a ``--device`` that does not exist here, and a ``--model`` / ``--models`` name that
    cannot be loaded here (usage errors; nothing is loaded)."""
    device = getattr(args, "device", None)
    if device is not None:
        try:
            resolve_device(device)
        except ValueError as error:
            raise UsageError(f"--device {device}: {_message(error)}") from None
    names = [getattr(args, "model", None)] + list(getattr(args, "models", None) or [])
    for name in names:
        if name is None or str(name) in _CHECKED_NAMES:
            continue
        flag = "--model" if name == getattr(args, "model", None) else "--models"
        try:
            check_model_name(name, allow_download=bool(getattr(args, "allow_download", False)))
        except ValueError as error:
            raise UsageError(f"{flag} {name}: {_message(error)}") from None
        _CHECKED_NAMES.add(str(name))
    check_layers(args)


def check_layers(args) -> None:
    """Refuse ``--layers`` beyond the model's blocks, read from its config before it loads."""
    layers = getattr(args, "layers", None)
    if not layers or getattr(args, "model", None) is None:
        return
    n_layers = model_layer_count(args.model)
    if n_layers is None:
        return  # not known before loading (a name to download): the loaded model checks
    bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]}: {args.model} has {n_layers} layers (0..{n_layers - 1})")


_CHECKED_NAMES: set[str] = set()


def check_chat_templates(names: list[str], needed_for: str, instead: str) -> None:
    """Refuse a model whose tokenizer files show no chat template when ``needed_for`` needs one.

    Read from the model's files before loading; a model whose files are not known yet (an
    embedded model not built) is left to the check after loading.
    """
    for name in names:
        if chat_template_available(name) is False:
            raise UsageError(f"--models {name}: its tokenizer has no chat template, which {needed_for} needs; "
                             f"{instead}")


def claim_on_main(stack: contextlib.ExitStack, args, command: str, owned: tuple[str, ...]):
    """Claim ``args.out`` for ``command`` on rank 0 only (under torchrun the other ranks compute and
    return ``None``; alone, this process is rank 0), held until ``stack`` closes."""
    if not distributed.is_main():
        return None
    return stack.enter_context(claim_output(args.out, command, command_config(args), overwrite=args.overwrite,
                                            owned_names=owned))


def finished_everywhere(claim) -> bool:
    """Whether rank 0's claim found the result already there; every rank gets rank 0's answer."""
    return bool(distributed.all_gather(claim.finished if claim is not None else None)[0])


def command_config(args) -> dict:
    """The settings of a parsed command (what ``--config`` replays), JSON-ready.

    Every command takes its settings from here after reading its inputs and before claiming its
    output folder, so the model names and device are checked here too
    (:func:`check_model_arguments`): an unknown model or device is a usage error before any folder
    is created or model loaded.
    """
    check_model_arguments(args)
    return finite_or_none({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS})


def _message(error: BaseException) -> str:
    text = str(error) if not isinstance(error, KeyError) else str(error.args[0] if error.args else error)
    text = " ".join(text.split())
    return text or type(error).__name__


def _config_argv(parser: argparse.ArgumentParser, config: dict, source: Path) -> list[str]:
    """Turn a recorded config back into flags, so the values pass the same checks as typed ones."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    tokens: list[str] = []
    for key, value in config.items():
        if key in NOT_SETTINGS:
            continue
        action = actions.get(key)
        if action is None:
            raise UsageError(f"{source}: setting {key!r} is not an option of `{parser.prog}`")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                tokens.append(flag)
        elif value is None or value == []:
            continue
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def _expand_config(parser: argparse.ArgumentParser, commands: dict, argv: list[str]) -> list[str]:
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in commands:
        return argv  # argparse reports the missing or unknown command
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UsageError("argument --config: expected a config.json path")
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"--config {source}: no such file; expected a config.json written by surprise-probe")
    try:
        record = read_json(source)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UsageError(f"--config {source}: expected a JSON object with a 'config' object (a config.json "
                         "written by surprise-probe)")
    if record.get("command") not in (None, command):
        raise UsageError(f"--config {source} records a `{record.get('command')}` run, not `{command}`")
    at = rest.index(command) + 1
    return rest[:at] + _config_argv(commands[command], record["config"], source) + rest[at:]


def run_main(parser: argparse.ArgumentParser, commands: dict, argv: list[str] | None,
             before: Callable[[argparse.Namespace], object] | None = None) -> int:
    """Parse, run (after ``before(args)``, e.g. the thread setting), and apply the error policy (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), None) or "surprise-probe"
    prefix = f"surprise-probe {command}" if command in commands else "surprise-probe"
    try:
        args = parser.parse_args(_expand_config(parser, commands, argv))
        if before is not None:
            with usage_errors():
                before(args)
        return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; what was written is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {_message(error)}" + ("" if debug else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return 1
