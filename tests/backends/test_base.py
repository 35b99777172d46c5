"""The backend registry: it makes and loads predictors by backend name or file ending, and
imports neither torch nor TVM itself."""

from __future__ import annotations

import pytest

from pfp.backends import base
from pfp.backends.base import Backend


def test_base_imports_neither_torch_nor_tvm():
    import subprocess
    import sys

    code = "import sys; import pfp.backends.base; print('torch' in sys.modules, 'tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'onnx'; choose one of: torch, tvm"):
        base.factory("onnx")


def test_load_picks_the_backend_by_file_ending(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the backend"):
        base.load(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError):
        base.load(tmp_path / "model.npz")


def test_a_backend_factory_comes_from_its_module_on_first_use(monkeypatch):
    monkeypatch.setattr(base, "_FACTORIES", {})
    assert base.factory("torch").backend is Backend.TORCH
