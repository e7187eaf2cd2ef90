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
