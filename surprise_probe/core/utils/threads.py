"""CPU threads that share the machine well: how many, and how they wait.

PyTorch's CPU kernels run on OpenMP threads (GNU libgomp in the PyPI wheels). Between two
parallel regions an idle libgomp thread spins (about 300,000 iterations, ~1 ms) before it sleeps;
alone that saves a wake-up, but beside any other CPU-bound work (a second job, a browser, CI) the
spinning takes cores the other work needs and both slow down (scripts/bench_contention.py
measures it; docs/benchmarks.md has the figures). So the toolkit:

- sets passive waiting (``OMP_WAIT_POLICY=PASSIVE``: an idle thread sleeps at once) in the
  environment when ``surprise_probe`` is imported before torch, unless you set
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` yourself (the OpenMP runtime reads them once, when
  torch loads it). Chosen over libgomp's default and over a short spin (``GOMP_SPINCOUNT=10000``)
  by scripts/bench_contention.py (docs/benchmarks.md);
- uses as many threads as CPUs are really available to the process (:func:`available_cpus`: its
  CPU affinity and the cgroup's CPU quota, not the machine's core count), set by the CLI at start
  (``--threads`` or ``SURPRISE_PROBE_THREADS`` override) and by :func:`configure_threads` for
  library users.

>>> available_cpus() >= 1
True
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["WAIT_POLICY", "available_cpus", "prefer_passive_waiting", "configure_threads", "thread_settings"]

# How idle OpenMP threads wait (libgomp's default spins ~300,000 iterations first). Chosen with
# scripts/bench_contention.py: see docs/benchmarks.md.
WAIT_POLICY = "PASSIVE"
THREADS_VARIABLE = "SURPRISE_PROBE_THREADS"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def prefer_passive_waiting(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask OpenMP threads to sleep when idle; only before torch loads, and only if you set nothing.

    ``environ`` defaults to ``os.environ``. Returns whether the setting was made. Called by
    ``import surprise_probe``.
    """
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: ``$SURPRISE_PROBE_THREADS``, else torch's
    current count capped at the CPUs available to this process: never more threads than CPUs it
    may use, and never more than a caller already chose); returns the count used.

    >>> import torch
    >>> configure_threads(1), torch.get_num_threads()
    (1, 1)
    """
    import torch

    if threads is None:
        configured = os.environ.get(THREADS_VARIABLE, "").strip()
        if configured:
            if not configured.isdigit() or int(configured) < 1:
                raise ValueError(f"{THREADS_VARIABLE}={configured!r}: expected an integer >= 1")
            threads = int(configured)
        else:
            threads = min(torch.get_num_threads(), available_cpus())
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    return int(threads)


def thread_settings() -> dict:
    """What is in force (for benchmarks and run records)."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "available_cpus": available_cpus(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}
