"""Shared helpers of the TVM backend tests (tolerances, random posteriors, RPC processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from pfp.backends.torch_ref import GaussianLayerParams
from pfp.spec import ModelSpec

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
