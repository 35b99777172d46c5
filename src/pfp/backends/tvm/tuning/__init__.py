"""Meta Scheduler tuning of PFP Relax modules (TVM 0.27, ``tvm.s_tir.meta_schedule``).

* :mod:`~pfp.backends.tvm.tuning.search`: the entry point, :func:`~.search.tune_module`, which wires
  the tasks, the builder and runner, the database and the run-off;
* :mod:`~pfp.backends.tvm.tuning.config`: :class:`~.config.TuneConfig`, :class:`~.config.TuneReport`,
  :class:`~.config.ScheduleSource`;
* :mod:`~pfp.backends.tvm.tuning.measure`: builder and runner (local or RPC), measuring schedules;
* :mod:`~pfp.backends.tvm.tuning.records`: the JSON database, the resume state file, the source of a record;
* :mod:`~pfp.backends.tvm.tuning.runoff`: the side-by-side run-off that picks each task's schedule;
* :mod:`~pfp.backends.tvm.tuning.guard`: the whole-model guard (tuned vs all-hand module, with a busy-host check);
* :mod:`~pfp.backends.tvm.tuning._compat`: work-arounds of TVM 0.27 limitations.

Example::

    >>> from pfp.backends.tvm.graph import build_pfp_module
    >>> from pfp.backends.tvm.pipeline import compile_tuned
    >>> from pfp.backends.tvm.tuning.config import TuneConfig
    >>> from pfp.backends.tvm.tuning.search import tune_module
    >>> mod = build_pfp_module(spec, params, batch_size=1)
    >>> config = TuneConfig(work_dir="tuning/mlp_host", trials_per_task=64, max_trials_global=512)
    >>> database = tune_module(mod, config=config)              # resumable: same work_dir
    >>> executable = compile_tuned(mod, config.target, database)

Measurements run locally by default; with ``rpc_tracker="host:port"`` and ``rpc_key`` they
run on the board registered at that tracker (see ``infra/rpc/README.md``). For aarch64
targets the candidates are linked with ``aarch64-linux-gnu-gcc`` by the builder
(:func:`~.measure.export_aarch64_so`), so the board needs no compiler.

Resuming: the JSON database (``work_dir/database_workload.json`` and
``database_tuning_record.json``) is never deleted. Tasks already finished (recorded in
``work_dir/pfp_tune_state.json``, or with at least ``trials_per_task`` records) are skipped;
unfinished tasks are tuned again with the records already measured as the search's warm start.

Choosing per task: the database accumulates records measured at different times, and on a
shared host a record's time depends on when it was taken. So every run ends with a run-off
(:func:`~.runoff.run_off`): per task the hand schedule and the ``finalists`` best other records
are built again and measured side by side, in ``selection_rounds`` interleaved rounds. Their
medians go to a fresh database, ``work_dir/selection``, which is what compiled modules use
(:func:`pfp.backends.tvm.pipeline.compiling_database`); the cumulative database stays the search's memory. The
report names where each kept schedule came from (:class:`~.config.ScheduleSource`).
"""
