"""The served endpoint: the LeNet bundle registered as ``pfp-lenet``, promoted, and served by ``mlflow models serve``."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from pfp.mlflow_model import log_bundle_model
from pfp.registry import Evaluation, promote, register_version
from tests.servers import mlflow_model_server, real_images, reset_registry

EVALUATION = Evaluation(accuracy=0.98, nll=0.06, ece=0.01, auroc_mi=0.95, latency_b1_ms=0.03)


@pytest.fixture(scope="package")
def champion(mlflow_server, lenet_bundle):
    """The bundle logged and registered as the first version of pfp-lenet (champion by default)."""
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    reset_registry(client, ("lenet",))
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("pfp-serving-tests")
    with mlflow.start_run(run_name="publish@lenet") as run:
        info = log_bundle_model(lenet_bundle, images=real_images(3))
    version = register_version(client, "lenet", info.model_uri, EVALUATION, run_id=run.info.run_id, model_id=info.model_id)
    decision = promote(client, "lenet")
    assert decision.promoted and decision.champion_after == version.version
    yield version
    reset_registry(client, ("lenet",))  # the session's server is shared: leave no pfp-* model behind


@pytest.fixture(scope="package")
def endpoint(mlflow_server, champion, tmp_path_factory):
    """``mlflow models serve -m models:/pfp-lenet@champion --env-manager local`` on loopback; its URL."""
    log = tmp_path_factory.mktemp("serving") / "serve.log"
    with mlflow_model_server("models:/pfp-lenet@champion", mlflow_server, log) as url:
        yield url
