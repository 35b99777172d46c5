"""Real servers on loopback for the tests: an MLflow tracking server and an MLflow model server.

Helpers, not a test module; the fixtures built on them are in ``tests/conftest.py``
(``mlflow_server``) and ``tests/serving/conftest.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: seconds a test server gets to stop after SIGTERM before SIGKILL (gunicorn's graceful timeout is 30 s; the
#: tests' state lives in temp folders, so nothing is lost by not waiting for it)
STOP_GRACE = 10


def source_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout's sources first on PYTHONPATH (the editable install may point elsewhere)."""
    paths = [str(REPO / "src"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "PFP_RUNTIME_THREADS": "1", **extra}


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            process.wait(timeout=30)
            pytest.fail(f"{what} did not start (exit {process.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def _process(command: list[str], log: Path, env: dict[str, str] | None, health: str, what: str, timeout: float) -> Iterator[None]:
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(health, process, log, what, timeout)
            yield
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 15)  # the server and the workers it started (its own session)
                try:
                    process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait(timeout=30)


@contextmanager
def mlflow_tracking_server(root: Path, timeout: float = 300) -> Iterator[str]:
    """``mlflow server`` (SQLite store, local artifacts under ``root``) on a free loopback port; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with _process(command, root / "server.log", None, f"{url}/health", "MLflow server", timeout):
        yield url


@contextmanager
def mlflow_model_server(model_uri: str, tracking_uri: str, log: Path, timeout: float = 300) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI --env-manager local`` (one worker) on a free loopback port; yields its URL."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    env = source_env(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    url = f"http://127.0.0.1:{port}"
    with _process(command, log, env, f"{url}/ping", f"model server for {model_uri}", timeout):
        yield url


def real_images(count: int, *, start: int = 0) -> np.ndarray:
    """``count`` real MNIST test digits (uint8, (count, 28, 28)) from the committed sample in data/embedded."""
    from pfp.data.idx import load_split

    images, _ = load_split(REPO / "data" / "embedded" / "mnist", "t10k")
    return images[start:start + count]


def reset_registry(client, models: tuple[str, ...] = ("mlp", "lenet")) -> None:
    """Delete the registered models ``pfp-MODEL`` (and their versions): the next version registered is the first."""
    from pfp.registry import registered_name

    for model in models:
        name = registered_name(model)
        if client.search_registered_models(f"name = '{name}'"):
            client.delete_registered_model(name)


@contextmanager
def prefect_server(root: Path, timeout: float = 300) -> Iterator[str]:
    """``prefect server start`` (SQLite under ``root``) on a free loopback port; yields its API URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    with _process(command, root / "server.log", env, f"{url}/health", "Prefect server", timeout):
        yield url


@contextmanager
def prefect_worker(api_url: str, pool: str, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool POOL`` against ``api_url`` (the pool must exist); yields the process."""
    env = {**(env or os.environ), "PREFECT_API_URL": api_url, "DO_NOT_TRACK": "1"}
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--prefetch-seconds", "5"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 15)
                try:
                    process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait(timeout=30)
