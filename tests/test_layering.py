"""The import graph: the library never imports the app layer, and the app layer has no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
APP = ("surprise_probe.cli", "surprise_probe.commands", "surprise_probe.study")
FOLDERS = {"surprise_probe": ROOT / "surprise_probe", "surprise_probe.probes": ROOT / "probes",
           "surprise_probe.interventions": ROOT / "interventions"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_app(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APP)


def test_the_library_never_imports_the_app_layer():
    modules = _modules()
    assert "surprise_probe.probes.sweep" in modules and "surprise_probe.commands.fit" in modules
    offenders = {name: sorted(i for i in _imports(path) if _is_app(i))
                 for name, path in modules.items() if not _is_app(name)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_top_level_probes_or_interventions_imports():
    for name, path in _modules().items():
        bad = {i for i in _imports(path) if i.split(".")[0] in ("probes", "interventions")}
        assert not bad, f"{name} imports {bad}; use surprise_probe.probes / surprise_probe.interventions"


def test_no_import_circle_through_the_app_layer():
    modules = _modules()
    graph = {name: {i for i in _imports(path) if i in modules} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    for name in modules:
        if _is_app(name) and name != "surprise_probe.commands":
            assert not reaches(name, name), f"{name} imports itself through a circle"
    # cli reaches every command statically (no __import__, no optional commands)
    cli = _imports(modules["surprise_probe.cli"])
    for command in ("models", "capture", "generate", "fit", "steer", "patch", "study"):
        assert f"surprise_probe.commands.{command}" in cli
