"""Shared test setup.

The machine runs long jobs next to the tests: torch's intra-op thread pool would
oversubscribe the cores and make tiny tensor ops dozens of times slower, so every test runs
single-threaded (the previous setting is restored afterwards). TVM's runtime gets one thread
too (pfp.backends.tvm would otherwise start one per physical core, here and in the stage
subprocesses of the end-to-end tests, which inherit the environment).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.servers import mlflow_tracking_server, prefect_server  # noqa: E402


@pytest.fixture(autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback (SQLite store, local artifacts), one per test session; its URL."""
    with mlflow_tracking_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    """A real ``prefect server`` on loopback (SQLite), one per test session; its API URL, also set as PREFECT_API_URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as url:
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def lenet_bundle(tmp_path_factory):
    """One small LeNet bundle (random posterior, batch sizes 1 and 4, hand schedules) for the MLflow and serving tests."""
    from tests.common import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "lenet", "lenet").folder


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The reliability suite's figures (tests/reliability/report.py), printed and written as JSON."""
    from tests.reliability import report

    entries = report.rows()
    if not entries:
        return
    path = report.write(os.environ.get("PFP_RELIABILITY_REPORT", report.DEFAULT_REPORT))
    terminalreporter.section("reliability")
    for entry in entries:
        terminalreporter.write_line(f"{entry.kind:9s} {entry.tried:6d} tried {entry.survived:6d} survived  {entry.row}")
    terminalreporter.write_line(f"(written to {path})")
