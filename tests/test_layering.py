"""The floor plan: the folder says the layer, and imports run one way between folders.

Every module's imports are parsed (function-local ones included). Each folder is a node and each
``__init__.py`` a node of its own; the order is

    core (utils < models < text < forward < capture) < probes < interventions < analyses < report < app

with the package root (``surprise_probe/__init__.py``: the public API; ``testing``: tiny models;
``_moved``: old module paths) above the core and below everything that imports it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"surprise_probe": ROOT / "surprise_probe", "surprise_probe.probes": ROOT / "probes",
           "surprise_probe.interventions": ROOT / "interventions"}
LAYERS = ["core.utils", "core.models", "core.text", "core.forward", "core.capture", "root", "probes",
          "interventions", "analyses", "report", "app"]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            out[".".join((package, *parts)).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _import_nodes(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``a.b.func`` -> ``a.b``), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    found = set()
    for _, names in _import_nodes(MODULES[module]):
        for name in names:
            target = _resolve(name) if name.startswith("surprise_probe") else None
            if target and target != module:
                found.add(target)
    return found


def _folder_node(module: str) -> str:
    path = MODULES[module]
    return f"{path.parent.relative_to(ROOT)}/__init__" if path.name == "__init__.py" else str(path.parent.relative_to(ROOT))


def _layer(module: str) -> str:
    rel = MODULES[module].relative_to(ROOT).parts
    if rel[0] in ("probes", "interventions"):
        return rel[0]
    if len(rel) == 2:  # surprise_probe/<module>.py: the package root
        return "root"
    if rel[1] == "core":
        return f"core.{rel[2]}" if len(rel) > 3 else "root"  # core/__init__.py documents the core only
    return rel[1]


def test_the_layout_is_what_the_docs_say():
    assert {"surprise_probe.core.capture.run", "surprise_probe.core.forward.hooks", "surprise_probe.probes.sweep",
            "surprise_probe.interventions.steering_sweep", "surprise_probe.analyses.policy.gap", "surprise_probe.report.html",
            "surprise_probe.app.cli", "surprise_probe.app.commands.fit", "surprise_probe.app.study.runner"} <= set(MODULES)
    assert {_layer(m) for m in MODULES} <= set(LAYERS)


def test_imports_run_downwards_between_layers():
    upward = []
    for module in MODULES:
        for target in _imports(module):
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                upward.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_package_root_imports_only_the_core():
    for module in ("surprise_probe", "surprise_probe.testing", "surprise_probe._moved"):
        bad = [t for t in _imports(module) if not _layer(t).startswith("core") and _layer(t) != "root"]
        assert not bad, (module, bad)
    for module in MODULES:  # nothing below the app imports the public-API root (it imports them)
        if _layer(module) not in ("app", "root"):
            assert "surprise_probe" not in _imports(module), module


def test_no_import_circle_between_folders():
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        for target in _imports(module):
            a, b = _folder_node(module), _folder_node(target)
            if a != b:
                graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted(node for node in graph if reaches(node, node))
    assert not circles, f"import circles through: {circles}"


def test_the_projects_own_modules_are_imported_at_the_top():
    local = []
    for path in MODULES.values():
        for node, names in _import_nodes(path):
            if node.col_offset > 0 and any(n.startswith("surprise_probe") for n in names):
                local.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not local, local


def test_no_top_level_probes_or_interventions_imports():
    for module, path in MODULES.items():
        bad = {n for _, names in _import_nodes(path) for n in names if n.split(".")[0] in ("probes", "interventions")}
        assert not bad, f"{module} imports {bad}; use surprise_probe.probes / surprise_probe.interventions"


def test_cli_reaches_every_command_statically():
    cli = _imports("surprise_probe.app.cli")
    for command in ("models", "capture", "generate", "fit", "steer", "patch", "gap", "intention", "study"):
        assert f"surprise_probe.app.commands.{command}" in cli


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_600_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it by concept"


def test_a_function_local_upward_import_would_be_seen(tmp_path, monkeypatch):
    """The checks can fail: an import planted inside a function of a core module is found and is upward."""
    planted = tmp_path / "metrics.py"
    planted.write_text(MODULES["surprise_probe.core.forward.metrics"].read_text()
                       + "\n\ndef _late():\n    from surprise_probe.probes.sweep import fit_sweep\n")
    monkeypatch.setitem(MODULES, "surprise_probe.core.forward.metrics", planted)
    assert "surprise_probe.probes.sweep" in _imports("surprise_probe.core.forward.metrics")
    assert LAYERS.index(_layer("surprise_probe.probes.sweep")) > LAYERS.index("core.forward")
