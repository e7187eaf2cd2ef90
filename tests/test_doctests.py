"""Run every docstring example in the installed package, each module imported once by its name.

pytest's ``--doctest-modules`` imports files by path, which would import ``probes/ridge.py`` as a
top-level ``probes.ridge`` beside ``surprise_probe.probes.ridge``; walking the installed package
imports each module exactly once, under the name users import it by.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import surprise_probe.interventions
import surprise_probe.probes

# probes/ and interventions/ live outside surprise_probe/ on disk (package-dir mapping), so walk
# each one, sub-packages included.
PACKAGES = (surprise_probe, surprise_probe.probes, surprise_probe.interventions)
MODULES = sorted(
    {package.__name__ for package in PACKAGES}
    | {
        info.name
        for package in PACKAGES
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
        if not info.name.endswith("__main__")
    }
)


def test_every_module_is_found():
    assert {"surprise_probe.probes.ridge", "surprise_probe.core.forward.edits",
            "surprise_probe.app.commands.fit", "surprise_probe.analyses.policy.gap"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, one_thread):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
