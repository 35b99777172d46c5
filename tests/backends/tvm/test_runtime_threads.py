"""pfp.backends.tvm sizes TVM's thread pool by physical cores, not TVM's halved x86 guess."""

from __future__ import annotations

import os
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
    cpus = sorted(os.sched_getaffinity(0))
    siblings = {open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read().strip() for cpu in cpus}
    assert physical_cores() == len(siblings)
    assert 1 <= physical_cores() <= len(cpus)


def test_runtime_uses_every_physical_core():
    pytest.importorskip("tvm")
    setting, threads = _probe()
    assert setting == str(physical_cores())
    assert threads == physical_cores()  # without the setting TVM 0.27 starts cores // 2 on x86


def test_explicit_thread_setting_wins():
    pytest.importorskip("tvm")
    assert _probe(TVM_NUM_THREADS="1") == ("1", 1)
