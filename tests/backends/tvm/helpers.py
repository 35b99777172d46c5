"""Shared helpers of the TVM backend tests (tolerances, random posteriors, RPC processes)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from pfp.backends.torch_ref import GaussianLayerParams
from pfp.spec import Dense, Flatten, ModelSpec, ReLU

#: Batch size of the compiled networks of the shared fixtures (conftest.py).
BATCH = 3
#: Relative tolerance required of every TVM result against the PyTorch reference (float32).
RTOL = 1e-4
#: Absolute slack, as a fraction of the largest reference value of the same tensor. It only
#: matters for entries close to 0, for two reasons: (1) a sum of mixed-sign terms (a mean near 0)
#: carries a rounding error ~1e-7 x the size of its terms that depends on the summation order,
#: so no two implementations agree on it in relative terms; (2) torch's float32
#: ``special.ndtr`` is computed as (1 + erf)/2, whose lower tail has an absolute error of
#: ~6e-8 and no relative accuracy below a ~ -4 (ndtr(-6) == 0): moments that are tiny because
#: of it (a ReLU with a = mean/std < -3, a Clark max with a dominated input) differ from our
#: accurate erfc-based Phi by up to ~1e-7 of the tensor's scale. 1e-6 of the scale is 10x that.
ATOL_FRACTION = 1e-6


def assert_close(actual, expected, *, rtol: float = RTOL, atol_fraction: float = ATOL_FRACTION, what: str = ""):
    actual = np.asarray(actual)
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    atol = atol_fraction * float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def random_params(spec: ModelSpec, seed: int = 0) -> dict[str, GaussianLayerParams]:
    """Random mean-field posterior: N(0, 1/fan_in) means, weight/bias variances ~ U(1e-4, 1e-2)."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for layer in spec.parametric_layers():
        fan_in = int(np.prod(layer.weight_shape[1:]))
        weight_mean = torch.randn(layer.weight_shape, generator=generator) / fan_in**0.5
        weight_var = 1e-4 + (1e-2 - 1e-4) * torch.rand(layer.weight_shape, generator=generator)
        bias_mean = 0.1 * torch.randn(layer.bias_shape, generator=generator)
        bias_var = 1e-4 + (1e-2 - 1e-4) * torch.rand(layer.bias_shape, generator=generator)
        params[layer.name] = GaussianLayerParams.from_mean_var(weight_mean, weight_var, bias_mean, bias_var)
    return params


def layer_params(out_shape: tuple[int, ...], seed: int) -> GaussianLayerParams:
    """Random parameters of one layer with weight shape ``out_shape`` (out first)."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = int(np.prod(out_shape[1:]))
    return GaussianLayerParams.from_mean_var(
        torch.randn(out_shape, generator=generator) / fan_in**0.5,
        1e-4 + (1e-2 - 1e-4) * torch.rand(out_shape, generator=generator),
        0.1 * torch.randn(out_shape[:1], generator=generator),
        1e-4 + (1e-2 - 1e-4) * torch.rand(out_shape[:1], generator=generator))


# --------------------------------------------------------------------------- RPC processes

RPC_DIR = Path(__file__).resolve().parents[3] / "infra" / "rpc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process_group(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``command`` under ``nice -n 19`` in a new session (its process group id is its pid), output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(["nice", "-n", "19", *command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process_group(process: subprocess.Popen) -> None:
    """Terminate the process group started for ``process`` (the RPC server's session workers too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group id is the pid
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=10)
            time.sleep(0.5)  # let the group's other members handle SIGTERM
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (orphaned session workers)
    except ProcessLookupError:
        pass
    process.wait()


def start_tracker(env: dict, port: int, log: Path, timeout: float = 60.0) -> subprocess.Popen:
    """infra/rpc/start-tracker.sh on 127.0.0.1:``port``, returned once it accepts connections."""
    env = dict(env, TRACKER_HOST="127.0.0.1", TRACKER_PORT=str(port), TRACKER_PORT_END=str(port + 1))
    process = start_process_group(["bash", str(RPC_DIR / "start-tracker.sh")], env, log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                stop_process_group(process)
                raise RuntimeError(f"tracker did not start: {log.read_text()}") from None
            time.sleep(0.3)


def wait_for_key(port: int, key: str, server: subprocess.Popen, log: Path, timeout: float = 60.0) -> float:
    """Wait until a server is registered under ``key`` at the tracker on ``port``; returns the seconds waited."""
    import tvm.rpc

    start = time.monotonic()
    while key not in tvm.rpc.connect_tracker("127.0.0.1", port).text_summary():
        if time.monotonic() - start > timeout or server.poll() is not None:
            raise RuntimeError(f"no server registered under key {key!r} after {time.monotonic() - start:.0f} s "
                               f"(exit code {server.poll()}): {log.read_text()}")
        time.sleep(0.5)
    return time.monotonic() - start


# --------------------------------------------------------------------------- tuning (tests/backends/tvm/tuning)

TRIALS = 2
SPEC = ModelSpec("tiny", (1, 4, 4), (Flatten(), Dense("fc1", 16, 8), ReLU(), Dense("fc2", 8, 3)))
TARGET = {"kind": "llvm", "num-cores": 1}


def fast_config(work_dir, **overrides):
    """A few trials, a small evolutionary population and short measurements: seconds per task."""
    from pfp.backends.tvm.tuning.config import TuneConfig

    settings = dict(trials_per_task=TRIALS, max_trials_global=3 * TRIALS, num_trials_per_iter=TRIALS,
                    target=TARGET, work_dir=str(work_dir), builder_workers=1, number=2, repeat=1,
                    min_repeat_ms=1, population_size=16, genetic_num_iters=1, init_min_unmeasured=4,
                    seed=0, session_timeout_sec=60, selection_rounds=2)  # run-off: one round each way
    settings.update(overrides)
    return TuneConfig(**settings)


def run_local(executable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    mean, var = vm["main"](tvm.runtime.tensor(x))
    return mean.numpy(), var.numpy()


def selected_record(database, task) -> tuple:
    """(source, seconds) of the record a compiled module takes for ``task``."""
    from pfp.backends.tvm.tuning.records import hand_trace_text, record_source

    (record,) = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
    return record_source(record.trace, hand_trace_text(task)), float(record.run_secs[0])


def assert_selection_follows_report(mod, selection, report, finalists: int) -> None:
    """Per side-by-side task, the selection's best record is the report's choice, with its figure."""
    import pytest

    from pfp.backends.tvm.tuning.records import count_records
    from pfp.backends.tvm.tuning.search import extract_tuning_tasks

    kept = report.kept()
    for task in extract_tuning_tasks(mod, TARGET):
        if task.task_name not in report.side_by_side:
            continue
        kind, seconds = selected_record(selection, task)
        assert kind == kept[task.task_name]
        expected = report.hand_ms[task.task_name] if kind == "hand" else report.other_ms[task.task_name]
        assert seconds * 1e3 == pytest.approx(expected)
        # one median each: the hand schedule's alone when it stays, else also up to `finalists` others
        count = count_records(selection, task.dispatched[0])
        assert count == 1 if kind == "hand" else 2 <= count <= 1 + finalists


# --------------------------------------------------------------------------- single operators (tests/backends/tvm/ops)

@functools.cache
def compiled_op(op_name: str, shapes: tuple, **kwargs):
    """Compile each (operator, shapes, options) once per test session (an ``ops.CompiledOp``)."""
    from pfp.backends.tvm import ops

    return ops.CompiledOp(getattr(ops, op_name), shapes, **kwargs)


def run_op(op_name: str, *arrays, **kwargs) -> list[np.ndarray]:
    arrays = [a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32) for a in arrays]
    return compiled_op(op_name, tuple(a.shape for a in arrays), **kwargs)(*arrays)


def gaussian_input(shape, seed: int, var_range=(1e-3, 0.5)):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=generator)
    var = var_range[0] + (var_range[1] - var_range[0]) * torch.rand(shape, generator=generator)
    return mean, var
