"""TVM 0.27 backend of the Probabilistic Forward Pass.

* :mod:`pfp.backends.tvm.ops` - TE operators (joint mean+variance reductions, separate-path
  ablation operators, moment-matched ReLU / 2x2 max-pool, deterministic twin operators);
* :mod:`pfp.backends.tvm.build` - ModelSpec + parameters -> Relax IRModule -> compiled
  runner (``compile_pfp``, ``compile_deterministic``, ``make_target``, ``load_compiled``).

Importing this package does not import TVM (that takes seconds); its submodules do.
"""
