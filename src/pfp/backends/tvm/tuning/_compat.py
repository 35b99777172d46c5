"""Work-arounds of TVM 0.27 (each names the limitation it works around).

* :func:`import_tensor_intrinsics`: TVMScript's parser calls ``inspect.stack()`` per function,
  which is slow with torch loaded; the import runs with a light stack (:func:`light_stack`);
* :func:`unnamed_handlers_detached`: the Meta Scheduler's logger setup fails on unnamed handlers
  (and leaves its logger at DEBUG);
* :func:`untunable`: the task scheduler's FLOP estimate has no rule for ``tirx.Let``.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import sys

__all__ = ["import_tensor_intrinsics", "light_stack", "unnamed_handlers_detached", "untunable"]


def light_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without ``inspect.getmodule``: source lines straight from ``linecache``."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno or 1
        lines = linecache.getlines(filename, frame.f_globals)
        start = max(0, min(lineno - 1 - context // 2, len(lines) - context))
        code_context = lines[start:start + context] if lines and context > 0 else None
        index = lineno - 1 - start if code_context else None
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name, code_context, index))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (the Meta Scheduler needs it) in seconds, not minutes.

    Its modules define some 250 TVMScript functions, and the parser calls ``inspect.stack()``
    for each one. That looks up every frame's module by scanning ``sys.modules``, which is slow
    when torch and pyro are loaded: the first tuning in a stage or test process took 80-120 s
    here, nearly all of it in this import. The same frames and source lines are handed to the
    parser from ``linecache`` while the import runs.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = light_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


@contextlib.contextmanager
def unnamed_handlers_detached():
    """Work around the Meta Scheduler's logger setup failing on a second tuning run in a process.

    ``ms.logging.create_loggers`` lists the handlers of the ``tvm.s_tir.meta_schedule`` logger
    by name in a ``dictConfig``; an unnamed handler (pytest's log capture adds some) makes it
    crash (``'NoneType' object has no attribute 'format'``). They are detached while the
    loggers are created and attached again afterwards.
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [handler for handler in ms_logger.handlers if handler.get_name() is None]
    level = ms_logger.level
    for handler in unnamed:
        ms_logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            ms_logger.addHandler(handler)
        # create_loggers also sets the logger to DEBUG, and the next run's console handler takes the
        # logger's level: a caller's quieter level would hold for the first run only
        ms_logger.setLevel(level)


def untunable(task) -> str | None:
    """Why the Meta Scheduler cannot tune ``task``, or None.

    The task scheduler estimates each task's FLOPs first, and that analysis has no rule for
    ``tirx.Let`` expressions, which the Gaussian ReLU / max-pool operators use (scalars
    computed once per element): it would abort the whole tuning run. Such tasks are
    elementwise or pooling kernels that gain little from tuning; they keep the default
    hand schedule.
    """
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        estimate_tir_flops(task.dispatched[0])
    except Exception as error:  # tvm.error.InternalError: Do not have a default for prim.Let
        return f"FLOP estimation fails: {str(error).strip().splitlines()[-1]}"
    return None
