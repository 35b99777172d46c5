"""Stage `evaluate@MODEL` as a function: the tune stage's PFP library (or a board's stand-in),
metrics and plots in the stage's layout."""

from __future__ import annotations

import json

import pytest

from pfp.config import EvaluateConfig, PFPBackend, TuneParams
from pfp.data.idx import DataError
from pfp.stages import evaluate

SCALE = 0.5  # the workspace's calibration (tests/stages/conftest.py)
CONFIG = EvaluateConfig(svi_samples=3, logit_samples=4, moment_samples=3, moment_images=4, ece_bins=5, batch_size=7,
                        fidelity_samples=10, fidelity_images=4)


def test_evaluate_takes_the_tuned_library_and_refuses_a_stale_one(tuned_workspace, tune_params, monkeypatch):
    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    library, path = evaluate.tuned_pfp_library("mlp", tune_params, SCALE)
    assert path == "models/mlp/tvm/host/pfp_b2.so" and library.describe()["variance_scale"] == SCALE
    with pytest.raises(DataError, match="variance scale 0.5, calibration says 1.0; re-run tune"):
        evaluate.tuned_pfp_library("mlp", tune_params, 1.0)


def test_evaluate_compiles_on_the_host_when_the_libraries_are_for_a_board():
    board = TuneParams(target="rasp4b", rpc={"tracker": "127.0.0.1:9190", "key": "rasp4b"})
    library, note = evaluate.tuned_pfp_library("mlp", board, 1.0)
    assert library is None and "rasp4b is a board" in note


def test_missing_library_names_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="run the tune stage first"):
        evaluate.tuned_pfp_library("mlp", TuneParams(batch_sizes=[2]), SCALE)


@pytest.mark.parametrize("backend", [PFPBackend.TVM, PFPBackend.TORCH], ids=lambda b: b.value)
def test_run_writes_metrics_and_plots(tuned_workspace, tune_params, monkeypatch, backend):
    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    config = CONFIG.model_copy(update={"pfp_backend": backend})
    outcome = evaluate.run("mlp", config, tune_params, seed=0)
    assert str(outcome.results_path) == "metrics/evaluate/mlp.json"
    assert json.loads(outcome.results_path.read_text()) == json.loads(json.dumps(outcome.results))
    assert set(outcome.results) == {"svi", "pfp", "det", "deployed"} and outcome.results["pfp"]["backend"] == backend.value
    assert outcome.tags["pfp.backend"] == backend.value and outcome.tags["calibrate.objective"] == "nll"
    if backend is PFPBackend.TVM:
        assert outcome.results["pfp"]["library"] == outcome.tags["pfp.library"] == "models/mlp/tvm/host/pfp_b2.so"
    else:
        assert "library" not in outcome.results["pfp"] and "pfp.library" not in outcome.tags
    assert sorted(p.name for p in outcome.plot_dir.iterdir()) == ["fidelity.png", "mi_hist.png", "reliability.png",
                                                                  "roc.png", "sme_hist.png"]
    assert list(outcome.results["pfp"]["fidelity"]) == ["pfp", "pfp_nll"]  # the workspace's calibration: 0.5, no fits
    # the figures' data for `dvc plots diff`: the training loss per epoch, ROC and reliability per method
    series = evaluate.series_dir("mlp")
    assert sorted(p.name for p in series.iterdir()) == ["fidelity.csv", "loss.csv", "reliability.csv", "roc.csv"]
    assert (series / "fidelity.csv").read_text().splitlines()[0] == (
        "quantile,pfp_mnist,pfp_ambiguous,pfp_fashion,pfp_nll_mnist,pfp_nll_ambiguous,pfp_nll_fashion")
    assert (series / "loss.csv").read_text() == "epoch,elbo_loss\n1,2.0\n2,1.5\n3,1.25\n"
    assert (series / "roc.csv").read_text().splitlines()[0] == "fpr,svi_mi,svi_sme,pfp_mi,pfp_sme,det_mi,det_sme"


def test_both_backends_give_the_same_pfp_metrics(tuned_workspace, tune_params, monkeypatch):
    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    results = {backend: evaluate.run("mlp", CONFIG.model_copy(update={"pfp_backend": backend}), tune_params,
                                     seed=0).results["pfp"] for backend in PFPBackend}
    for key in ("accuracy", "nll", "ece", "brier", "mi_id", "mi_ood"):
        assert results[PFPBackend.TVM][key] == pytest.approx(results[PFPBackend.TORCH][key], rel=1e-3, abs=1e-6), key


def test_evaluate_refuses_another_models_library_and_a_stale_one(tuned_workspace, tune_params, monkeypatch, tmp_path):
    """Tried by a user: a LeNet evaluation ran on the MLP's compiled library and reported its accuracy as LeNet's."""
    import shutil

    from ..common import write_model_artifacts

    workspace, _ = tuned_workspace
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy)
    monkeypatch.chdir(copy)
    write_model_artifacts(copy, "lenet", variance_scale=SCALE)
    shutil.copytree(copy / "models/mlp/tvm", copy / "models/lenet/tvm")
    with pytest.raises(DataError, match=r"models/lenet/tvm/host/pfp_b2.so: a compiled library of model 'mlp', "
                                        r"expected 'lenet'.*re-run the tune@lenet stage"):
        evaluate.tuned_pfp_library("lenet", tune_params, SCALE)
    # the MLP retrained (another posterior, PFP file and calibration): its library is stale
    write_model_artifacts(copy, "mlp", variance_scale=SCALE, seed=7)
    with pytest.raises(DataError, match=r"pfp_b2.so: compiled from other calibration, pfp_params, posterior than the "
                                        r"workspace holds \(stale library\); re-run the tune@mlp stage"):
        evaluate.tuned_pfp_library("mlp", tune_params, SCALE)


def test_deployed_metrics_are_the_host_bundles_flags_at_its_threshold(tuned_workspace, tune_params, monkeypatch):
    """Oracle: the torch PFP and the numpy head with the bundle's draws, thresholded independently."""
    from pfp.artifacts.trained import load_trained
    from pfp.convert import predict_pfp
    from pfp.data.dirty_mnist import load_prepared, normalise
    from pfp.head import head_draws, head_reference

    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    deployed = evaluate.run("mlp", CONFIG, tune_params, seed=0).results["deployed"]
    meta = json.loads((workspace / "models/mlp/bundle/host/bundle.json").read_text())
    assert deployed["threshold"] == meta["ood"]["threshold"] and deployed["score"] == "mi"
    trained, arrays = load_trained("mlp"), load_prepared("data/prepared")
    draws = head_draws(meta["head"]["draws"], 10, seed=meta["head"]["seed"])
    accepted = {}
    for name, key in (("mnist", "mnist_test"), ("fashion", "ood_test"), ("ambiguous", "ambiguous_test")):
        mean, var = predict_pfp(trained.pfp_model, normalise(arrays[f"{key}_x"]), variance_scale=SCALE)
        mi = head_reference(mean.numpy(), var.numpy(), draws, meta["calibration"]["temperature"])["mi"]
        accepted[name] = float((mi <= deployed["threshold"]).mean())
    assert deployed["tpr_mnist"] == pytest.approx(accepted["mnist"])
    assert deployed["fpr"] == pytest.approx({"fashion": accepted["fashion"], "ambiguous": accepted["ambiguous"]})
    assert deployed["flagged"]["fashion"] == pytest.approx(1 - accepted["fashion"])


def test_loss_series_needs_the_train_stages_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"metrics/train_mlp.json: not found; run the train@mlp stage first"):
        evaluate.write_loss_series("mlp")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train_mlp.json").write_text('{"final_elbo_loss": 1.0}')
    with pytest.raises(DataError, match=r"metrics/train_mlp.json: no elbo_loss list .*re-run the train@mlp stage"):
        evaluate.write_loss_series("mlp")
