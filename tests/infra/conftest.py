"""Setup for the infra tests: one TVM runtime thread, as in tests/backends/tvm (shared 2-core machine)."""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")
