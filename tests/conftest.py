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


# Under pytest-xdist (`make test` runs `-n 2`) a worker takes a whole group of tests, so that what they share is
# built once: a folder whose tests share costly session fixtures (the e2e flow run, the emulated Pi and the
# stack, the stage workspace, the runtime bundles), else a module (its module-scoped fixtures). The longest
# groups go first (XDIST_FIRST, longest first), so that no worker starts one of them near the end.
XDIST_FOLDERS = ("tests/e2e/", "tests/infra/", "tests/stages/", "tests/runtime/")
XDIST_FIRST = ("tests/e2e/", "tests/infra/", "tests/reliability/test_tuning_faults.py", "tests/reliability/test_pipeline_faults.py",
               "tests/backends/tvm/tuning/test_fanout.py", "tests/test_tuning.py", "tests/backends/tvm/tuning/test_search.py")


def xdist_group(nodeid: str) -> str:
    """The group of a test: its folder if listed in XDIST_FOLDERS, else its module."""
    module = nodeid.split("::", 1)[0]
    return next((folder for folder in XDIST_FOLDERS if module.startswith(folder)), module)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: its collection is the controller's queue, in this order
        first = {group: rank for rank, group in enumerate(XDIST_FIRST)}
        items.sort(key=lambda item: first.get(xdist_group(item.nodeid), len(first)))  # stable: the rest as collected


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling over :func:`xdist_group`, in collection order (its own loadgroup reads a node id
    field pytest 9 dropped, and its scope scheduling would reorder the groups by their number of tests)."""
    if config.getvalue("dist") == "each":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def pytest_sessionfinish(session):
    """An xdist worker hands its reliability rows to the controller (pytest_testnodedown), which reports them all."""
    if hasattr(session.config, "workeroutput"):
        from tests.reliability import report

        session.config.workeroutput["reliability_rows"] = [dict(entry.__dict__) for entry in report.rows()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from tests.reliability import report

    report.merge(getattr(node, "workeroutput", {}).get("reliability_rows", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The reliability suite's figures (tests/reliability/report.py), printed and written as JSON."""
    from tests.reliability import report

    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes the whole report
        return
    entries = report.rows()
    if not entries:
        return
    path = report.write(os.environ.get("PFP_RELIABILITY_REPORT", report.DEFAULT_REPORT))
    terminalreporter.section("reliability")
    for entry in entries:
        terminalreporter.write_line(f"{entry.kind:9s} {entry.tried:6d} tried {entry.survived:6d} survived  {entry.row}")
    terminalreporter.write_line(f"(written to {path})")
