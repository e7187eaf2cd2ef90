"""Package discovery for the one namespace ``surprise_probe`` (everything else is in pyproject.toml).

The repository keeps ``probes/`` and ``interventions/`` at the top (the design card's layout) but
installs them as ``surprise_probe.probes`` and ``surprise_probe.interventions``. pyproject.toml
cannot combine package discovery with that mapping, and a hand-written list once left
``surprise_probe.app.commands`` out of the wheel; so every package under the three folders is found
here, and tests/packaging checks the built wheel holds every module.
"""

from setuptools import find_namespace_packages, setup

FOLDERS = {"surprise_probe": "surprise_probe", "surprise_probe.probes": "probes",
           "surprise_probe.interventions": "interventions"}
EXCLUDE = ["*.__pycache__", "__pycache__", "probes", "probes.*", "interventions", "interventions.*"]


def _packages() -> list[str]:
    found = []
    for package, folder in FOLDERS.items():
        found.append(package)
        # namespace discovery: a data-only folder (surprise_probe/data) is a package too, so its
        # files are package data and setuptools has nothing to warn about
        found += [f"{package}.{sub}" for sub in find_namespace_packages(where=folder, exclude=EXCLUDE)]
    return sorted(set(found))


setup(
    packages=_packages(),
    package_dir=FOLDERS,
    package_data={"surprise_probe.data": ["*.jsonl", "*.txt"]},
)
