"""Compiling modules: memory estimate, code for another architecture."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from pfp.backends.tvm import graph, pipeline  # noqa: E402
from pfp.spec import build_spec  # noqa: E402

from .helpers import random_params  # noqa: E402


def test_memory_estimate_counts_weights_and_planned_activations():
    spec = build_spec("lenet")
    params = random_params(spec)
    pfp = pipeline.memory_estimate(graph.build_pfp_module(spec, params, batch_size=4))
    det = pipeline.memory_estimate(graph.build_deterministic_module(spec, params, batch_size=4))
    floats = sum(int(np.prod(layer.weight_shape)) + int(np.prod(layer.bias_shape)) for layer in spec.parametric_layers())
    assert det["weight_bytes"] == 4 * floats
    # PFP stores mean, variance and E[w^2] of every weight (the bias has mean and variance; the
    # first layer needs no E[w^2]): at most 3x the twin's weights
    assert 2 * det["weight_bytes"] < pfp["weight_bytes"] <= 3 * det["weight_bytes"]
    assert 0 < det["activation_bytes"] < pfp["activation_bytes"] <= 2 * det["activation_bytes"] + 1024
    assert pfp["total_bytes"] == pfp["weight_bytes"] + pfp["activation_bytes"]
    as_params = pipeline.memory_estimate(graph.build_pfp_module(spec, params, batch_size=4, weights_as_params=True))
    assert as_params["weight_bytes"] == pfp["weight_bytes"]


def test_arm_module_holds_aarch64_code(arm_runner, tmp_path):
    """The kernels are aarch64 machine code (checked on the object file; linking needs the cross gcc)."""
    (llvm_module,) = [m for m in arm_runner.module.mod.imports if m.kind == "llvm"]
    llvm_module.write_to_file(str(tmp_path / "kernels.o"))
    header = (tmp_path / "kernels.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
