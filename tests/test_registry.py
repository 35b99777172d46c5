"""The registry and the promotion gate against a real MLflow tracking server on loopback.

The versions are registered from one small logged pyfunc model (the gate reads only the figures
a version carries); tests/serving registers and serves real bundles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pfp import tracking
from pfp.config import ConfigError, PromoteConfig, load_params, parse_params
from pfp.registry import (
    CHALLENGER,
    CHAMPION,
    Check,
    Evaluation,
    bundle_sha256,
    compare,
    evaluation_from_metrics,
    find_version,
    log_decision,
    promote,
    register_version,
    registered_name,
    version_evaluation,
)
from pfp_runtime import load_bundle
from pfp_runtime.bundle import write_checksums
from tests.common import write_prepared
from tests.servers import real_images, reset_registry

BASE = Evaluation(accuracy=0.98, nll=0.06, ece=0.010, auroc_mi=0.95, latency_b1_ms=0.030)
TRAIN = {"mlp": {"epochs": 1}, "lenet": {"epochs": 1}}


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def logged_model(mlflow_server):
    """One small pyfunc model logged on the server: (model URI, model id, run id)."""
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("pfp-registry-tests")
    with mlflow.start_run(run_name="registry-source") as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    return info.model_uri, info.model_id, run.info.run_id


@pytest.fixture
def client(mlflow_server, logged_model):
    """A client of the server whose pfp-* registered models are deleted before and after (each test starts with an empty registry)."""
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    reset_registry(client)
    yield client
    reset_registry(client)  # the session's server is shared: leave no pfp-* model behind


def _register(client, logged_model, evaluation: Evaluation, model: str = "lenet", **kwargs) -> str:
    uri, model_id, run_id = logged_model
    return register_version(client, model, uri, evaluation, run_id=run_id, model_id=model_id, **kwargs).version


def _alias(client, model: str, alias: str) -> str:
    return client.get_model_version_by_alias(registered_name(model), alias).version


def test_first_version_becomes_champion(client, logged_model):
    version = _register(client, logged_model, BASE)
    assert _alias(client, "lenet", CHALLENGER) == version
    decision = promote(client, "lenet")
    assert decision.promoted and decision.version == version and decision.champion_before is None
    assert decision.champion_after == version == _alias(client, "lenet", CHAMPION)
    assert "first version" in decision.reason and decision.checks == []
    # the figures travel with the version: read back from the registry, exactly
    assert version_evaluation(client, "lenet", version) == BASE
    # architectures are separate registered models
    assert registered_name("mlp") == "pfp-mlp" and not client.search_model_versions("name = 'pfp-mlp'")
    # the same version again: nothing to do, not an error
    again = promote(client, "lenet", version)
    assert not again.promoted and again.reason == "already the champion" and _alias(client, "lenet", CHAMPION) == version


def test_worse_challenger_is_refused_and_the_champion_stays(client, logged_model, capsys):
    champion = _register(client, logged_model, BASE)
    promote(client, "lenet")
    worse = Evaluation(accuracy=BASE.accuracy - 0.02, nll=BASE.nll + 0.01, ece=BASE.ece, auroc_mi=BASE.auroc_mi + 0.01,
                       latency_b1_ms=BASE.latency_b1_ms)
    challenger = _register(client, logged_model, worse)
    decision = promote(client, "lenet", config=PromoteConfig())
    assert not decision.promoted and decision.failed_checks == ["accuracy"]
    assert "accuracy" in decision.reason
    assert _alias(client, "lenet", CHAMPION) == champion == decision.champion_after == decision.champion_before
    assert _alias(client, "lenet", CHALLENGER) == challenger == decision.version
    accuracy = decision.checks[0]
    assert (accuracy.challenger, accuracy.champion, accuracy.status) == (pytest.approx(0.96), pytest.approx(0.98), "fail")
    assert accuracy.limit == pytest.approx(0.975)
    assert [c.status for c in decision.checks] == ["fail", "pass", "pass", "pass", "pass"]

    # recorded on a run: params, metrics, the JSON artifact; and printed as a table
    with mlflow.start_run(run_name="promote-test") as run:
        pass
    log_decision(client, run.info.run_id, decision)
    recorded = client.get_run(run.info.run_id).data
    assert recorded.params["promote.lenet.decision"] == "kept" and recorded.params["promote.lenet.version"] == challenger
    assert recorded.params["promote.lenet.champion_before"] == champion
    assert recorded.metrics["promote.lenet.promoted"] == 0.0 and recorded.metrics["promote.lenet.accuracy.passed"] == 0.0
    assert recorded.metrics["promote.lenet.accuracy.challenger"] == pytest.approx(0.96)
    assert recorded.metrics["promote.lenet.nll.limit"] == pytest.approx(0.08)
    assert recorded.tags["promote.lenet.decision"] == "kept"
    artifact = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="promotion/lenet.json",
                                                                   tracking_uri=client.tracking_uri)).read())
    assert artifact["failed_checks"] == ["accuracy"] and artifact["promoted"] is False and len(artifact["checks"]) == 5
    table = decision.table()
    print(table)
    assert "not promoted" in capsys.readouterr().out
    lines = table.splitlines()
    assert lines[1].split()[:6] == ["check", "challenger", "champion", "limit", "rule", "result"]
    assert lines[2].split()[:4] == ["accuracy", "0.9600", "0.9800", "0.9750"] and lines[2].endswith("fail")


def test_better_challenger_is_promoted(client, logged_model):
    _register(client, logged_model, BASE)
    promote(client, "lenet")
    better = Evaluation(accuracy=0.985, nll=0.05, ece=0.008, auroc_mi=0.96, latency_b1_ms=0.031)  # latency within 1.25x
    challenger = _register(client, logged_model, better)
    decision = promote(client, "lenet")
    assert decision.promoted and decision.reason == "every check passed" and decision.failed_checks == []
    assert _alias(client, "lenet", CHAMPION) == challenger == decision.champion_after
    by_name = {check.name: check for check in decision.checks}
    assert by_name["latency_b1_ms"].limit == pytest.approx(0.030 * 1.25)
    assert by_name["ece"].champion == pytest.approx(0.010) and by_name["ece"].challenger == pytest.approx(0.008)


def test_the_same_bundle_is_found_again(client, logged_model):
    version = _register(client, logged_model, BASE, bundle_sha256="ab" * 32)
    assert find_version(client, "lenet", "ab" * 32).version == version
    assert find_version(client, "lenet", "cd" * 32) is None


def test_checks_at_and_past_each_limit():
    config = PromoteConfig()
    at_limits = Evaluation(accuracy=BASE.accuracy - 0.005, nll=BASE.nll + 0.02, ece=BASE.ece + 0.01, auroc_mi=BASE.auroc_mi - 0.01,
                           latency_b1_ms=BASE.latency_b1_ms * 1.25)
    # tolerances are inclusive (up to float rounding of the sums)
    assert [c.status for c in compare(at_limits, BASE, PromoteConfig(max_accuracy_drop=0.00501, max_nll_rise=0.02001,
                                                                     max_ece_rise=0.01001, max_auroc_drop=0.01001,
                                                                     max_latency_ratio=1.2501))] == ["pass"] * 5
    past = Evaluation(accuracy=BASE.accuracy - 0.006, nll=BASE.nll + 0.021, ece=BASE.ece + 0.011, auroc_mi=BASE.auroc_mi - 0.011,
                      latency_b1_ms=BASE.latency_b1_ms * 1.26)
    checks = compare(past, BASE, config)
    assert [c.name for c in checks] == ["accuracy", "nll", "ece", "auroc_mi", "latency_b1_ms"]
    assert all(c.status == "fail" for c in checks)
    assert checks[1] == Check("nll", past.nll, BASE.nll, pytest.approx(0.08), "<= champion + 0.02", "fail")


def test_a_missing_latency_is_skipped_unless_required():
    slow_unknown = Evaluation(accuracy=0.98, nll=0.06, ece=0.01, auroc_mi=0.95, latency_b1_ms=None)
    assert compare(slow_unknown, BASE, PromoteConfig())[-1].status == "skipped"
    assert compare(slow_unknown, BASE, PromoteConfig(require_latency=True))[-1].status == "fail"


def test_evaluation_from_the_recorded_metrics():
    evaluate = json.load(open("metrics/evaluate.json"))
    latency = json.load(open("metrics/latency.json"))
    evaluation = evaluation_from_metrics(evaluate, latency, "lenet")
    assert evaluation.accuracy == evaluate["lenet"]["pfp"]["accuracy"] and evaluation.auroc_mi == evaluate["lenet"]["pfp"]["auroc_mi"]
    assert evaluation.latency_b1_ms == latency["lenet"]["batch_1"]["pfp_tvm_ms"]
    assert evaluation_from_metrics(evaluate, None, "mlp").latency_b1_ms is None
    served = {"summary": {"lenet": {"quiet": {"batch_1": {"pfp_runtime_p50_ms": 0.041}}}}}  # the deployed predictor's, preferred
    assert evaluation_from_metrics(evaluate, latency, "lenet", served).latency_b1_ms == 0.041
    assert evaluation_from_metrics(evaluate, latency, "mlp", served).latency_b1_ms == latency["mlp"]["batch_1"]["pfp_tvm_ms"]
    assert Evaluation.from_tags(evaluation.to_tags()) == evaluation
    with pytest.raises(ValueError, match="no pfp figures for model 'cnn'"):
        evaluation_from_metrics(evaluate, latency, "cnn")
    with pytest.raises(ValueError, match="nll = nan is not a finite number"):
        Evaluation(accuracy=0.9, nll=float("nan"), ece=0.1, auroc_mi=0.9)
    with pytest.raises(ValueError, match="tag pfp.metric.ece missing"):
        Evaluation.from_tags({"pfp.metric.accuracy": "0.9", "pfp.metric.nll": "0.1", "pfp.metric.auroc_mi": "0.9"})


def test_promote_section_in_the_params_files():
    for path in ("params.yaml", "configs/embedded.yaml"):
        raw = yaml.safe_load(open(path))
        assert set(raw["promote"]) == set(PromoteConfig.model_fields), path
        assert load_params(path).promote == PromoteConfig()
    with pytest.raises(ConfigError, match=r"promote\.max_nll_rise"):
        parse_params({"train": TRAIN, "promote": {"max_nll_rise": -0.1}})
    with pytest.raises(ConfigError, match=r"promote\.max_latency"):
        parse_params({"train": TRAIN, "promote": {"max_latency": 2}})


def _workspace(root: Path, bundle: Path, accuracy: float) -> Path:
    """What the flow's last step reads: params, the report's and the benchmark's metrics, prepared data, the bundle."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"models": ["lenet"], "train": {"lenet": {"epochs": 1}}}))
    evaluate = json.load(open("metrics/evaluate.json"))
    evaluate["lenet"]["pfp"]["accuracy"] = accuracy
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(evaluate))
    shutil.copy("metrics/latency.json", root / "metrics" / "latency.json")
    if not (root / "data").is_dir():
        write_prepared(root)
    target = root / "models" / "lenet" / "bundle" / "host"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
    return target


def test_publish_and_promote_step_of_the_flow(client, mlflow_server, lenet_bundle, tmp_path, monkeypatch, capsys):
    from flows.promotion import publish_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    workspace = tmp_path / "workspace"
    bundle = _workspace(workspace, lenet_bundle, accuracy=0.98)

    # as in the flow: the pipeline run is the active run of this process
    with tracking.pipeline_run("pipeline") as pipeline:
        first = publish_models(workspace, pipeline.run_id)["lenet"]
    parent = pipeline.run_id
    assert first["promoted"] and first["version"] == "1" and first["champion_after"] == "1"
    assert "pfp-lenet v1: PROMOTED to champion" in capsys.readouterr().out
    version = client.get_model_version("pfp-lenet", "1")
    assert float(version.tags["pfp.metric.accuracy"]) == 0.98 and version.tags["pfp.bundle_sha256"] == bundle_sha256(bundle)
    publish_run = client.get_run(version.run_id)
    assert publish_run.info.run_name == "publish@lenet" and publish_run.data.tags["mlflow.parentRunId"] == parent
    # the version is the model logged by that run (the UI's Models column of the publish run shows it)
    logged = [output.model_id for output in publish_run.outputs.model_outputs]
    assert len(logged) == 1 and version.source == f"models:/{logged[0]}"
    assert client.get_logged_model(logged[0]).source_run_id == publish_run.info.run_id
    assert publish_run.data.params["promote.lenet.decision"] == "promoted" and publish_run.data.metrics["gate.accuracy"] == 0.98
    # the registered model is the bundle: loaded back by alias, it predicts what the runtime does
    images = real_images(2).astype(np.float32) / np.float32(255)
    served = mlflow.pyfunc.load_model("models:/pfp-lenet@champion").predict(images)
    np.testing.assert_array_equal(served["probs"], load_bundle(bundle).predict(images).probs)

    # the same bundle again (a rerun where DVC skipped everything): no new version
    again = publish_models(workspace, parent)["lenet"]
    assert again["version"] == "1" and not again["promoted"] and again["reason"] == "already the champion"
    assert len(client.search_model_versions("name = 'pfp-lenet'")) == 1

    # another bundle whose accuracy is 0.05 lower: registered as challenger, refused, not an error; champion stays v1
    bundle = _workspace(workspace, lenet_bundle, accuracy=0.93)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["made_from"] = {"note": "retrained"}
    (bundle / "bundle.json").write_text(json.dumps(meta))
    write_checksums(bundle)
    worse = publish_models(workspace, parent)["lenet"]
    assert worse["version"] == "2" and not worse["promoted"] and worse["failed_checks"] == ["accuracy"]
    assert _alias(client, "lenet", CHAMPION) == "1" and _alias(client, "lenet", CHALLENGER) == "2"
    assert "pfp-lenet v2: not promoted (refused: accuracy outside the limits); champion v1" in capsys.readouterr().out
