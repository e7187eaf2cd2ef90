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
  library users. With passive waiting, two threads beside a job that keeps both cores busy cost
  0.78-0.89x the wall time and 0.96-1.05x the CPU time of one thread (scripts/bench_contention.py).
- ``SURPRISE_PROBE_THREADS=idle`` (or ``configure_threads(follow_load=True)``) instead uses as many
  threads as CPUs are idle when it starts (:func:`idle_cpus`, from ``/proc/stat`` over 0.1 s),
  measured again before each study stage. Not the default: in that benchmark it cost 1.14-1.44x
  the wall time of one thread where the default cost 0.78-1.08x.

>>> available_cpus() >= 1
True
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["WAIT_POLICY", "available_cpus", "idle_cpus", "prefer_passive_waiting", "configure_threads",
           "refresh_threads", "thread_settings"]

# How idle OpenMP threads wait (libgomp's default spins ~300,000 iterations first). Chosen with
# scripts/bench_contention.py: see docs/benchmarks.md.
WAIT_POLICY = "PASSIVE"
THREADS_VARIABLE = "SURPRISE_PROBE_THREADS"
# What configure_threads set last, and the ceiling it lowered from: a count it lowered for load
# may rise again to that ceiling when the load goes; a count the caller set is their ceiling.
_LAST: dict[str, int | None] = {"set": None, "ceiling": None}


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


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle jiffies incl. iowait, total jiffies)}`` from a ``/proc/stat``."""
    times = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def idle_cpus(interval: float = 0.1, stat: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's CPUs were idle over the next ``interval`` seconds (0 to their
    count), from ``/proc/stat``; ``None`` where that cannot be read (not Linux).

    >>> 0 <= (idle_cpus(0.05) or 0) <= available_cpus() + 1e-9
    True
    """
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None
    try:
        before = _cpu_times(stat)
        time.sleep(interval)
        after = _cpu_times(stat)
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        if (mine is not None and cpu not in mine) or cpu not in before:
            continue
        spent = total_after - before[cpu][1]
        idle += (idle_after - before[cpu][0]) / spent if spent > 0 else 1.0
    quota = _cgroup_quota()
    return min(idle, quota) if quota is not None else idle


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


def configure_threads(threads: int | None = None, follow_load: bool = False) -> int:
    """Set torch's intra-op threads to ``threads`` and return the count used.

    Default: ``$SURPRISE_PROBE_THREADS``, else torch's current count capped at the CPUs available
    to this process (never more threads than CPUs it may use, never more than a caller already
    chose) and, with ``follow_load`` (or ``SURPRISE_PROBE_THREADS=idle``), at the CPUs idle now
    (:func:`idle_cpus`, rounded, at least 1); :func:`refresh_threads` then re-measures, and a count
    lowered for load rises back.

    >>> import torch
    >>> configure_threads(1), torch.get_num_threads()
    (1, 1)
    """
    import torch

    if threads is None:
        configured = os.environ.get(THREADS_VARIABLE, "").strip()
        if configured == "idle":
            follow_load = True
        elif configured:
            if not configured.isdigit() or int(configured) < 1:
                raise ValueError(f"{THREADS_VARIABLE}={configured!r}: expected an integer >= 1 or 'idle'")
            threads = int(configured)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
        _LAST.update(set=None, ceiling=None)
        return int(threads)
    current = torch.get_num_threads()
    ceiling = _LAST["ceiling"] if _LAST["set"] == current and _LAST["ceiling"] else current
    ceiling = min(ceiling, available_cpus())
    idle = idle_cpus() if follow_load and ceiling > 1 else None
    threads = ceiling if idle is None else max(1, min(ceiling, math.floor(idle + 0.5)))
    torch.set_num_threads(threads)
    # Remembered only when chosen by load: refresh_threads re-measures then, and may rise back.
    _LAST.update(set=threads if follow_load else None, ceiling=ceiling if follow_load else None)
    return threads


def refresh_threads() -> int | None:
    """Before a long stage: measure the idle CPUs again and reset the count, only if the last
    :func:`configure_threads` chose it by load (``SURPRISE_PROBE_THREADS=idle``) and nobody changed
    it since; returns the new count, or ``None`` where it leaves it (the default).
    """
    import torch

    if _LAST["set"] is None or torch.get_num_threads() != _LAST["set"]:
        return None
    return configure_threads(follow_load=True)


def thread_settings() -> dict:
    """What is in force (for benchmarks and run records)."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "available_cpus": available_cpus(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}
