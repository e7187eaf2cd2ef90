"""Generate docs/api.md from the docstrings of the library's public names.

Every library module of ``surprise_probe`` (its sub-packages by layer, ``probes`` and
``interventions`` included, and ``testing``: the tiny models to try things on) is imported; its
``__all__`` names are documented in order with their signature and docstring, classes with their
public methods. The app layer (``surprise_probe.app``: cli, commands, study) and private modules
are left out. Output is deterministic, so a rerun on unchanged code gives the same file.

    .venv/bin/python scripts/make_api_docs.py            # writes docs/api.md
    .venv/bin/python scripts/make_api_docs.py --check    # exit 1 if docs/api.md is out of date
    .venv/bin/python scripts/make_api_docs.py --out /tmp/api.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import surprise_probe

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = {"app", "__main__"}
HEADER = """# API reference

Generated from the docstrings by `scripts/make_api_docs.py`; do not edit by hand (rerun the
script). Concepts and how-tos: [index.md](index.md). Every example marked `>>>` runs in the test
suite (tests/test_doctests.py).
"""


def library_modules() -> list[str]:
    """Importable library module names, package first, sorted (app layer and private ones out)."""
    names = ["surprise_probe"]
    infos = list(pkgutil.walk_packages(surprise_probe.__path__, "surprise_probe."))
    for sub in ("probes", "interventions"):  # installed from the top-level folders (package-dir mapping)
        package = importlib.import_module(f"surprise_probe.{sub}")
        infos += list(pkgutil.walk_packages(package.__path__, f"surprise_probe.{sub}."))
        names.append(package.__name__)
    for info in infos:
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts[1:]) or parts[1] in APP_LAYER or parts[-1] in APP_LAYER:
            continue
        names.append(info.name)
    return names[:1] + sorted(set(names[1:]))


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return text.replace(" -> None", "") if inspect.isclass(obj) else text


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip()


def _fence(doc: str) -> str:
    """Docstring text as markdown: each doctest block (``>>>`` up to a blank line) fenced as python."""
    out, in_block = [], False
    for line in doc.splitlines():
        if line.startswith(">>>") and not in_block:
            out.append("```python")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


def _owner(module_name: str, obj) -> str:
    return getattr(obj, "__module__", module_name) or module_name


def document_module(name: str) -> list[str]:
    module = importlib.import_module(name)
    exported = list(getattr(module, "__all__", []))
    lines = [f"## `{name}`", ""]
    summary = _doc(module)
    if summary:
        lines += [_fence(summary), ""]
    if name == "surprise_probe" or name.endswith((".probes", ".interventions")) and hasattr(module, "__path__"):
        # Packages re-export names documented in their own modules: list them with a pointer.
        if exported:
            lines.append("Re-exported here: " + ", ".join(
                f"`{item}` ({_owner(name, getattr(module, item)).replace('surprise_probe.', '')})"
                for item in exported if not item.startswith("__")) + ".")
            lines.append("")
        return lines
    for item in exported:
        obj = getattr(module, item, None)
        if obj is None:
            continue
        if not callable(obj):
            lines += [f"### `{item}`", "", f"Constant: `{type(obj).__name__}`.", ""]
            continue
        if _owner(name, obj) != name:
            continue  # a re-export, documented where it is defined
        if inspect.isclass(obj):
            lines += [f"### class `{item}{_signature(obj)}`", ""]
            doc = _doc(obj)
            if doc:
                lines += [_fence(doc), ""]
            if dataclasses.is_dataclass(obj):
                fields = [f"`{f.name}`" for f in dataclasses.fields(obj) if not f.name.startswith("_")]
                if fields:
                    lines += ["Fields: " + ", ".join(fields) + ".", ""]
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_") or not (inspect.isfunction(method) or isinstance(method, (classmethod, staticmethod, property))):
                    continue
                target = method.fget if isinstance(method, property) else getattr(method, "__func__", method)
                kind = "property" if isinstance(method, property) else "method"
                sig = "" if kind == "property" else _signature(target)
                lines.append(f"- {kind} `{method_name}{sig}`" + (f": {_doc(target).splitlines()[0]}" if _doc(target) else ""))
            lines.append("")
        elif callable(obj):
            lines += [f"### `{item}{_signature(obj)}`", ""]
            doc = _doc(obj)
            lines += [_fence(doc) if doc else "*(no docstring)*", ""]
    return lines


def render() -> str:
    lines = [HEADER]
    modules = library_modules()
    lines.append("Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in modules) + "\n")
    for name in modules:
        lines += document_module(name)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run: python scripts/make_api_docs.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    from surprise_probe.core.utils.jsonio import write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, text)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
