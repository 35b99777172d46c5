"""The end-to-end tests share one tiny flow run (the costly part) and its workspace."""

from __future__ import annotations

import pytest

from .flow_run import TinyRun, tiny_run


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, mlflow_server) -> TinyRun:
    """The flow, run once as `make run` runs it, on tiny data; later tests may run it again in the same workspace."""
    return tiny_run(tmp_path_factory.mktemp("tiny_pipeline"), mlflow_server)
