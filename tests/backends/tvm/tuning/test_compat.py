"""TVM 0.27 work-arounds: the tensor-intrinsics import with a light inspect.stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("tvm")


from pfp.backends.tvm.tuning._compat import light_stack  # noqa: E402


def test_light_stack_gives_the_frames_and_lines_of_inspect_stack():
    def where():
        return light_stack(), __import__("inspect").stack()

    light, full = where()
    assert len(light) == len(full)
    for mine, theirs in zip(light, full):
        assert mine.frame is theirs.frame
        assert (mine.filename, mine.lineno, mine.function) == (theirs.filename, theirs.lineno, theirs.function)
        assert mine.code_context == theirs.code_context and mine.index == theirs.index


def test_tensor_intrinsics_import_with_torch_loaded_restores_inspect():
    """In a fresh process with torch and pyro loaded (as in a stage): the intrinsics the Meta
    Scheduler looks up are registered, and ``inspect.stack`` is the standard one again."""

    code = ("import inspect, sys, torch, pyro\n"
            "original = inspect.stack\n"
            "from pfp.backends.tvm.tuning._compat import import_tensor_intrinsics\n"
            "import_tensor_intrinsics()\n"
            "import tvm\n"
            "assert 'tvm.s_tir.tensor_intrin' in sys.modules and inspect.stack is original\n"
            "from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN\n"
            "tvm.s_tir.TensorIntrin.get(VNNI_DOT_16x4_INTRIN)\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
