"""Threads that share the machine: how many (affinity and cgroup quota) and how they wait (short spin)."""

import os
import subprocess
import sys

import pytest
import torch

from surprise_probe.app.cli import main
from surprise_probe.core.utils import threads


def test_the_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert threads._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))


def test_passive_waiting_only_before_torch_and_only_if_the_user_chose_nothing():
    env = {}
    # torch is loaded in this process: the OpenMP runtime has read its settings already
    assert threads.prefer_passive_waiting(env) is False and env == {}
    code = ("import os, sys; import surprise_probe; "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", threads.WAIT_POLICY]
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "GOMP_SPINCOUNT": "5000"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["5000", "None"]  # the user's choice stands


def test_configure_threads_follows_the_variable_and_refuses_nonsense(monkeypatch):
    monkeypatch.setattr(threads, "idle_cpus", lambda *a, **k: 64.0)  # an idle machine
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.THREADS_VARIABLE, "1")
        assert threads.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(threads.THREADS_VARIABLE, "two")
        with pytest.raises(ValueError, match="SURPRISE_PROBE_THREADS='two'"):
            threads.configure_threads()
        monkeypatch.delenv(threads.THREADS_VARIABLE)
        torch.set_num_threads(64)  # more than this process may use: capped
        assert threads.configure_threads() == threads.available_cpus()
        torch.set_num_threads(1)  # a caller's own lower choice stands
        assert threads.configure_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_cli_sets_threads_and_refuses_a_bad_count(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "models", "--json"]) == 0 and torch.get_num_threads() == 1
        assert main(["--threads", "0", "models"]) == 2
        assert "--threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def _stat(cpus: list[tuple[int, int]]) -> str:
    """A /proc/stat with one line per CPU: (busy jiffies, idle jiffies)."""
    lines = ["cpu  0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0" for i, (busy, idle) in enumerate(cpus)]
    return "\n".join(lines + ["intr 1 2 3"]) + "\n"


def test_idle_cpus_reads_proc_stat_over_the_interval(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat([(100, 100), (100, 100)]))
    # Over the interval CPU 0 is busy 3/4 of the time, CPU 1 idle throughout: 0.25 + 1.0 idle.
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.write_text(_stat([(175, 125), (100, 200)])))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.idle_cpus(0.01, stat) == pytest.approx(1.25)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {1})  # only CPUs this process may use
    stat.write_text(_stat([(100, 100), (100, 100)]))
    assert threads.idle_cpus(0.01, stat) == pytest.approx(1.0)
    assert threads.idle_cpus(0.01, tmp_path / "missing") is None


def test_threads_follow_the_idle_cpus_and_come_back(monkeypatch):
    before = torch.get_num_threads()
    idle = {"now": 0.2}
    monkeypatch.setattr(threads, "idle_cpus", lambda *a, **k: idle["now"])
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.delenv(threads.THREADS_VARIABLE, raising=False)
    try:
        torch.set_num_threads(2)
        assert threads.configure_threads() == 2  # the default does not follow load
        assert threads.refresh_threads() is None
        assert threads.configure_threads(follow_load=True) == 1  # both cores busy with other work
        idle["now"] = 1.9
        assert threads.refresh_threads() == 2 and torch.get_num_threads() == 2  # the load went: back to 2
        idle["now"] = 0.9
        assert threads.refresh_threads() == 1
        monkeypatch.setenv(threads.THREADS_VARIABLE, "idle")  # the variable opts in too
        idle["now"] = 0.0
        assert threads.configure_threads() == 1
        monkeypatch.delenv(threads.THREADS_VARIABLE)
        threads.configure_threads(2)  # a fixed count (--threads) is never changed by load
        assert threads.refresh_threads() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        threads._LAST.update(set=None, ceiling=None)
