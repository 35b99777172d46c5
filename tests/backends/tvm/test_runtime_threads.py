"""pfp.backends.tvm sizes TVM's thread pool by physical cores, not TVM's halved x86 guess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pfp.backends.tvm import physical_cores

PROBE = ("import os, pfp.backends.tvm, tvm; "
         "print(os.environ['TVM_NUM_THREADS'], tvm.get_global_func('runtime.NumThreads')())")


def _probe(**env) -> tuple[str, int]:
    environ = {key: value for key, value in os.environ.items() if key not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_physical_cores_counts_hyper_thread_siblings_once():
    """Against util-linux's lscpu (its own topology reading): distinct (core, socket) among our CPUs."""
    if shutil.which("lscpu") is None:
        pytest.skip("lscpu is not installed")
    allowed = os.sched_getaffinity(0)
    rows = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    cores = {tuple(fields[1:]) for fields in (line.split(",") for line in rows.splitlines() if not line.startswith("#"))
             if int(fields[0]) in allowed}
    assert physical_cores() == len(cores)
    assert 1 <= physical_cores() <= len(allowed)


def test_runtime_uses_every_physical_core():
    pytest.importorskip("tvm")
    setting, threads = _probe()
    assert setting == str(physical_cores())
    assert threads == physical_cores()  # without the setting TVM 0.27 starts cores // 2 on x86


def test_explicit_thread_setting_wins():
    pytest.importorskip("tvm")
    assert _probe(TVM_NUM_THREADS="1") == ("1", 1)
