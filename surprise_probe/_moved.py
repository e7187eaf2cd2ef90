"""Old module paths (before the floor plan of 2026-12) keep working for one release, with a warning.

``from surprise_probe.metrics import output_entropy`` still imports, and says where the name lives
now. Each old path is a small module registered up front in ``sys.modules`` (so importing it never
rebinds a public name such as the function ``surprise_probe.capture``); an attribute read on it
warns once per name and forwards to the new module. Submodules of a moved package
(``surprise_probe.commands.fit``) are aliased by a finder. Removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old path -> the new module(s) that hold its names, first match wins
MOVED: dict[str, tuple[str, ...]] = {
    "surprise_probe.models": ("surprise_probe.core.models.loading", "surprise_probe.core.models.embedded",
                              "surprise_probe.core.models.hooked"),
    "surprise_probe.basis": ("surprise_probe.core.models.basis",),
    "surprise_probe.devices": ("surprise_probe.core.models.devices",),
    "surprise_probe.distributed": ("surprise_probe.core.models.distributed",),
    "surprise_probe.chat": ("surprise_probe.core.text.chat",),
    "surprise_probe.inputs": ("surprise_probe.core.text.encoding",),
    "surprise_probe.io": ("surprise_probe.core.text.files",),
    "surprise_probe.alignment": ("surprise_probe.core.text.alignment",),
    "surprise_probe.metrics": ("surprise_probe.core.forward.metrics",),
    "surprise_probe.attention": ("surprise_probe.core.models.attention",),
    "surprise_probe.sampling": ("surprise_probe.core.forward.sampling",),
    "surprise_probe.generate": ("surprise_probe.core.forward.responses",),
    "surprise_probe.capture": ("surprise_probe.core.capture.run", "surprise_probe.core.forward.passes",
                               "surprise_probe.core.forward.hooks"),
    "surprise_probe.store": ("surprise_probe.core.capture.store", "surprise_probe.core.forward.hooks"),
    "surprise_probe.summary": ("surprise_probe.core.capture.summary",),
    "surprise_probe.jsonio": ("surprise_probe.core.utils.jsonio",),
    "surprise_probe.outputs": ("surprise_probe.core.utils.outputs",),
    "surprise_probe.stats": ("surprise_probe.core.utils.stats",),
    "surprise_probe.plots": ("surprise_probe.core.utils.plots",),
    "surprise_probe.policy": ("surprise_probe.analyses.policy.gap", "surprise_probe.analyses.policy.prompts",
                              "surprise_probe.analyses.policy.writers", "surprise_probe.analyses.policy.reading",
                              "surprise_probe.analyses.policy.statistics", "surprise_probe.analyses.policy.result"),
    "surprise_probe.policy_plots": ("surprise_probe.analyses.policy.plots",),
    "surprise_probe.intention": (
        "surprise_probe.analyses.intention.analysis",
        "surprise_probe.analyses.intention.config",
        "surprise_probe.analyses.intention.prompts",
        "surprise_probe.analyses.intention.results",
        "surprise_probe.analyses.intention.statistics",
        "surprise_probe.analyses.intention.samples",
        "surprise_probe.analyses.intention.commitment",
        "surprise_probe.analyses.intention.readout",
        "surprise_probe.analyses.intention.prefill",
        "surprise_probe.core.forward.sampling",  # PLAIN_FORMAT
    ),
    "surprise_probe.intention_plots": ("surprise_probe.analyses.intention.plots",),
    "surprise_probe.topics": ("surprise_probe.analyses.intention.topics",),
    "surprise_probe.token_view": ("surprise_probe.analyses.token_view",),
    "surprise_probe.cli": ("surprise_probe.app.cli",),
    "surprise_probe.study": ("surprise_probe.app.study",),
    "surprise_probe.commands": ("surprise_probe.app.commands",),
    "surprise_probe.interventions.generation": ("surprise_probe.interventions.steered_generation",),
    "surprise_probe.interventions.hooks": ("surprise_probe.core.forward.edits",),
    "surprise_probe.interventions.directions": ("surprise_probe.core.forward.directions",),
}
# (``surprise_probe.report`` is a package now and exports what the old module did.)
# An old path whose last part is also a public function: only the module form is shimmed, the
# attribute ``surprise_probe.capture`` stays the function.
_NOT_ATTRIBUTES = {"surprise_probe.capture"}


class _MovedModule(types.ModuleType):
    def __init__(self, old: str, new: tuple[str, ...]):
        super().__init__(old, f"Moved: use {' / '.join(new)}.")
        self._new = new
        self._warned: set[str] = set()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self._new:
            module = importlib.import_module(target)
            if hasattr(module, name):
                value = getattr(module, name)
                break
        else:
            try:  # a submodule of a moved package (``commands._common``)
                module = importlib.import_module(f"{self._new[0]}.{name}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {self.__name__!r} (moved to {self._new[0]}) has no attribute {name!r}") from None
            value, target = module, module.__name__
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"{self.__name__}.{name} moved to {target}; the old path is removed in 0.3",
                          DeprecationWarning, stacklevel=2)
        return value

    def __dir__(self):
        return sorted({name for target in self._new for name in dir(importlib.import_module(target))})


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``surprise_probe.commands.fit`` -> the module ``surprise_probe.app.commands.fit``."""

    def find_spec(self, fullname, path=None, target=None):
        for old, new in MOVED.items():
            if fullname.startswith(old + ".") and len(new) == 1:
                return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = next(o for o in MOVED if spec.name.startswith(o + "."))
        new_name = MOVED[old][0] + spec.name[len(old):]
        warnings.warn(f"{spec.name} moved to {new_name}; the old path is removed in 0.3", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new_name)

    def exec_module(self, module):
        pass


def install() -> None:
    """Register the old paths (called once, from ``surprise_probe/__init__``)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, _MovedModule(old, new))
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def attribute(name: str):
    """``surprise_probe.<old module>`` read as an attribute (module ``__getattr__`` of the package)."""
    old = f"surprise_probe.{name}"
    if old in MOVED and old not in _NOT_ATTRIBUTES:
        return sys.modules[old]
    raise AttributeError(f"module 'surprise_probe' has no attribute {name!r}")
