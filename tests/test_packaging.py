"""The wheel a regular ``pip install`` builds holds every module, its data, and nothing else.

The hand-written package list once left ``surprise_probe/commands/`` out, so a non-editable
install had no command line at all, while the editable install the tests use hid it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"surprise_probe": ROOT / "surprise_probe", "surprise_probe/probes": ROOT / "probes",
           "surprise_probe/interventions": ROOT / "interventions"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # From a clean copy: setuptools builds in the source tree and never empties its build/ folder,
    # so a module an earlier build copied there would hide one the configuration leaves out.
    source = tmp_path_factory.mktemp("source") / "surprise-probe"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(source), "-w", str(out)],
                   check=True, capture_output=True, env={"TMPDIR": str(build), "PATH": "/usr/bin:/bin"})
    wheels = list(out.glob("surprise_probe-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _expected_modules() -> set[str]:
    want = set()
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            want.add(f"{package}/{path.relative_to(folder).as_posix()}")
    return want


def test_every_module_is_in_the_wheel(wheel_names):
    missing = sorted(_expected_modules() - wheel_names)
    assert not missing, f"not in the wheel: {missing}"
    assert "surprise_probe/app/commands/study.py" in wheel_names  # the commands were once left out


def test_the_data_files_are_in_the_wheel(wheel_names):
    data = {f"surprise_probe/data/{p.name}" for p in (ROOT / "surprise_probe" / "data").iterdir() if p.is_file()}
    assert data and data <= wheel_names


def test_nothing_else_is_in_the_wheel(wheel_names):
    tops = {name.split("/")[0] for name in wheel_names}
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert tops - dist_info == {"surprise_probe"}, tops  # no top-level probes/, interventions/, tests/, docs/
    assert len(dist_info) == 1
    stray = sorted(n for n in wheel_names if "__pycache__" in n or n.endswith((".pyc", ".tmp")))
    assert not stray, stray


def test_the_console_script_points_at_a_module_in_the_wheel(wheel, wheel_names):
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
        lines = archive.read(entry_points).decode().splitlines()
    target = next(line.split("=", 1)[1].strip() for line in lines if line.startswith("surprise-probe"))
    assert target == "surprise_probe.app.cli:main"
    assert target.split(":")[0].replace(".", "/") + ".py" in wheel_names
