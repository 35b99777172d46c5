"""Setup for the TVM backend tests.

Untuned TVM kernels are serial, but the TVM runtime's thread pool would otherwise spin on
every core of this shared machine; one thread keeps the tests polite and their timing stable.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")
