"""Our passes of the PFP lowering, besides TVM's pipelines.

* :mod:`~pfp.backends.tvm.passes.reassociate` (TIR, before lowering): ``acc + (p + q)`` as
  ``(acc + p) + q`` in the blocks the hand schedule marked (two multiply-adds per term);
* :mod:`~pfp.backends.tvm.passes.denormals` (TIR, after lowering): kernels compute with
  subnormal floats flushed to zero;
* :mod:`~pfp.backends.tvm.passes.tir_pipeline`: both around TVM's S-TIR lowering, registered as
  a named TIR pipeline (compiled modules and tuning candidates alike);
* :mod:`~pfp.backends.tvm.passes.vm` (Relax, the VM program): the tuples ``CallTIRRewrite``
  makes of multi-output kernel calls are dropped.
"""

from pfp.backends.tvm.passes.denormals import FlushDenormals, flush_denormals
from pfp.backends.tvm.passes.reassociate import REASSOCIATE_ANNOTATION, ReassociateAccumulation, reassociate_accumulation
from pfp.backends.tvm.passes.tir_pipeline import register_pipeline
from pfp.backends.tvm.passes.vm import RemoveUnusedTuples, remove_unused_tuples, vm_lowering_passes

__all__ = ["REASSOCIATE_ANNOTATION", "FlushDenormals", "ReassociateAccumulation", "RemoveUnusedTuples", "flush_denormals",
           "reassociate_accumulation", "register_pipeline", "remove_unused_tuples", "vm_lowering_passes"]
