"""The tuning builder for ARM boards: cross-linked candidates, measured over RPC only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends.tvm.targets import ARM_CROSS_COMPILER, make_target  # noqa: E402
from pfp.backends.tvm.tuning.measure import export_aarch64_so, lean_build, make_builder  # noqa: E402
from tests.common import require_command  # noqa: E402

from ..helpers import fast_config  # noqa: E402


def test_arm_target_needs_rpc(tmp_path):
    target = make_target("rasp4b")
    if shutil.which(ARM_CROSS_COMPILER) is None:
        with pytest.raises(RuntimeError, match="aarch64-linux-gnu-gcc"):
            make_builder(target, fast_config(tmp_path))
    else:
        with pytest.raises(ValueError, match="rpc_tracker"):
            make_builder(target, fast_config(tmp_path))


def test_arm_export_hook_cross_links():
    compiler = require_command(ARM_CROSS_COMPILER, "gcc-aarch64-linux-gnu")
    a = tvm.te.placeholder((8,), name="a")
    b = tvm.te.compute((8,), lambda i: a[i] * 2.0, name="b")
    mod = tvm.IRModule({"main": tvm.te.create_prim_func([a, b])})
    rt_mod = lean_build(mod, make_target("rasp4b"))
    path = export_aarch64_so(rt_mod, cc=compiler)
    header = Path(path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
