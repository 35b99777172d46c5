"""TVM 0.27 backend of the Probabilistic Forward Pass.

Modules, imports running one way (``targets`` first, ``tuning`` last):

* :mod:`~pfp.backends.tvm.targets` - the board registry (TVM target, architecture, cross compiler,
  floating-point control, SIMD registers) and CPU features; a leaf;
* :mod:`~pfp.backends.tvm.ops` - TE operators (Gaussian math, linear, pointwise, ensemble);
* :mod:`~pfp.backends.tvm.graph` - ModelSpec + parameters -> Relax IRModule (one layer table per model kind);
* :mod:`~pfp.backends.tvm.schedules` - hand-written CPU schedules;
* :mod:`~pfp.backends.tvm.passes` - our passes (reassociation, denormal flush, VM tuple removal, the TIR pipeline);
* :mod:`~pfp.backends.tvm.pipeline` - compiling (``compile_module``, ``compile_pfp``, ...), memory estimate;
* :mod:`~pfp.backends.tvm.runtime` - compiled models (the Predictor protocol), export / load; imports no torch;
* :mod:`~pfp.backends.tvm.tuning` - Meta Scheduler tuning (search, records, run-off, measurement).

Importing this package does not import TVM (that takes seconds); its submodules do. It does
set the TVM runtime's thread count (see :func:`~pfp.backends.tvm.targets.physical_cores`) unless the user has.
"""

from __future__ import annotations

import os

from pfp.backends.tvm.targets import physical_cores

__all__ = ["physical_cores"]


# read by the runtime when its thread pool starts (first parallel call), also in the tuning
# runner's worker processes, which inherit the environment; an explicit setting wins
if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(physical_cores())
