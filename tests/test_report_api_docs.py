"""docs/api.md is generated from the docstrings by scripts/make_api_docs.py: it builds, and covers
every public name of the modules it documents."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_api_docs", ROOT / "scripts" / "make_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_docs_build_and_cover_every_public_function(tmp_path):
    script = _script()
    out = tmp_path / "api.md"
    assert script.main(["--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    headings = set(re.findall(r"^## `([\w.]+)`", text, flags=re.M))
    for module in ("surprise_probe.report.html", "surprise_probe.analyses.token_view", "surprise_probe.interventions.attribution",
                   "surprise_probe.probes.direction", "surprise_probe.core.capture.run"):
        assert module in headings, module
    assert not any(name.split(".")[-1] in ("cli", "study") for name in headings)  # no app layer
    for name in script.library_modules():
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            continue
        for item in getattr(module, "__all__", []):
            obj = getattr(module, item)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                assert re.search(rf"^### (class )?`{re.escape(item)}\(", text, flags=re.M), f"{name}.{item}"
    # doctest examples are fenced as python
    assert text.count("```python") >= 10 and text.count("```") % 2 == 0
    # deterministic: a second run writes the same text, and --check agrees
    assert script.main(["--out", str(out), "--check"]) == 0


def test_check_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "api.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert _script().main(["--out", str(stale), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_committed_api_md_is_generated_and_up_to_date():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert text.startswith("# API reference") and "scripts/make_api_docs.py" in text
    # A changed docstring or signature without a regenerated docs/api.md fails here.
    assert _script().main(["--out", str(ROOT / "docs" / "api.md"), "--check"]) == 0, \
        "docs/api.md is out of date: run python scripts/make_api_docs.py"
