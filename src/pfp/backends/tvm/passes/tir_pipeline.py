"""Our TIR pipeline, registered with TVM: :class:`ReassociateAccumulation`, TVM's S-TIR lowering, :class:`FlushDenormals`.

Tuning candidates (:func:`pfp.backends.tvm.tuning.measure.lean_build`) and compiled modules
(:func:`pfp.backends.tvm.pipeline.compile_scheduled`) are lowered alike, so what the tuner
measures is what ships.
"""

from __future__ import annotations

import functools

import tvm

from pfp.backends.tvm.passes.denormals import FlushDenormals
from pfp.backends.tvm.passes.reassociate import ReassociateAccumulation

__all__ = ["register_pipeline"]


@functools.cache
def register_pipeline(flush_denormals: bool = True) -> str:
    """Register our TIR pipeline (once per process) and return its name for ``tvm.tirx.build``/``relax.build``."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    name = "pfp_lowering" + ("_flush_denormals" if flush_denormals else "")

    def factory():
        lower, finalize_host, finalize_device = default_s_tir_pipeline()
        passes = [ReassociateAccumulation(), lower] + ([FlushDenormals()] if flush_denormals else [])
        return tvm.transform.Sequential(passes, name=name), finalize_host, finalize_device

    tvm.tirx.compilation_pipeline.register_tir_pipeline(name, factory)
    return name
