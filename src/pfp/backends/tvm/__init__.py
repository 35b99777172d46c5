"""TVM 0.27 backend of the Probabilistic Forward Pass.

* :mod:`pfp.backends.tvm.ops` - TE operators (joint mean+variance reductions, separate-path
  ablation operators, moment-matched ReLU / 2x2 max-pool, deterministic twin operators);
* :mod:`pfp.backends.tvm.build` - ModelSpec + parameters -> Relax IRModule -> compiled
  runner (``compile_pfp``, ``compile_deterministic``, ``make_target``, ``load_compiled``).

Importing this package does not import TVM (that takes seconds); its submodules do. It does
set the TVM runtime's thread count (see :func:`physical_cores`) unless the user has.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["physical_cores"]


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-thread siblings count once).

    TVM's runtime sizes its thread pool as *half* the logical CPUs on every x86 machine (it
    assumes 2-way hyper-threading). On VMs and other machines without SMT that leaves half of
    the cores idle: on our 2-vCPU machines every compiled module ran on one thread.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


# read by the runtime when its thread pool starts (first parallel call), also in the tuning
# runner's worker processes, which inherit the environment; an explicit setting wins
if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(physical_cores())
