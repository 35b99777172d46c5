"""Stage `benchmark` as a function: the tune stage's libraries timed beside the baselines,
latency and profile (memory, PFP operators) in the stage's layout."""

from __future__ import annotations

import json
import os

import pytest

from pfp.config import BenchmarkConfig, Peer, TuneParams, Variant
from pfp.stage import bundle_dir
from pfp.stages import benchmark

from ..common import make_bundle

#: the serving part kept small: 2 rounds of short turns, a 24-image head error (10,000 reference draws)
SERVING = {"serving_batch_sizes": [1, 2], "serving_threads": [1, 2], "serving_rounds": 2, "serving_turn_ms": 2.0,
           "serving_max_calls": 5, "serving_warmup": 1, "serving_torch_threads": 1, "head_images": 24,
           "head_reference_draws": 10_000}


@pytest.fixture(scope="module")
def bundled_workspace(tuned_workspace):
    """The tuned workspace with the bundle stage's host bundle of the same (random) MLP."""
    workspace, _ = tuned_workspace
    folder = workspace / bundle_dir("mlp", "host")
    if not folder.is_dir():
        make_bundle(folder, "mlp", batch_sizes=(1, 2), variance_scale=0.5)
    return workspace


def test_host_libraries_are_the_tuned_ones(tuned_workspace, tune_params, monkeypatch):
    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    libraries = benchmark.host_libraries("mlp", tune_params, 2)
    assert set(libraries) == {Variant.PFP, Variant.DET}
    assert all(library.describe()["schedule"] == "tuned" for library in libraries.values())
    assert benchmark.host_libraries("mlp", tune_params, 1) == {}
    board = TuneParams(target="rasp4b", rpc={"tracker": "127.0.0.1:9190", "key": "rasp4b"}, batch_sizes=[2])
    assert benchmark.host_libraries("mlp", board, 2) == {}


def test_memory_metrics_are_flat_per_batch():
    profile = {"mlp": {"batch_2": {"memory": {"pfp": {"total_bytes": 10}, "det": {"total_bytes": 4}}}}}
    assert benchmark.memory_metrics(profile) == {
        "mlp": {"batch_2": {"memory.pfp.total_bytes": 10, "memory.det.total_bytes": 4}}}


def test_run_writes_latency_profile_serving_and_plots(bundled_workspace, tune_params, monkeypatch):
    monkeypatch.chdir(bundled_workspace)
    threads_before = os.environ.get("TVM_NUM_THREADS")
    config = BenchmarkConfig(batch_sizes=[2], svi_samples=3, repeat=1, warmup=0, tvm_number=1, tvm_repeat=1,
                             memory_variants=[Variant.PFP, Variant.DET], peers=[Peer.DET_ONNXRUNTIME], **SERVING)
    outcome = benchmark.run(["mlp"], config, tune_params, seed=1)
    assert (str(outcome.latency_path), str(outcome.profile_path)) == ("metrics/latency.json", "metrics/profile.json")
    assert json.loads(outcome.latency_path.read_text()) == json.loads(json.dumps(outcome.latency))
    assert json.loads(outcome.profile_path.read_text()) == json.loads(json.dumps(outcome.profile))
    latency = outcome.latency["mlp"]["batch_2"]
    assert latency["schedules"] == {"pfp": "tuned", "det": "tuned", "pfp_separate": "hand", "svi": "hand"}
    assert latency["pfp_tvm_ms"] > 0 and latency["pfp_torch_ms"] > 0 and latency["svi_pyro_ms"] > 0
    # the configured peer (the cheapest to build) timed beside them, and only that one
    assert latency["det_onnxruntime_ms"] > 0 and set(latency["peers"]) == {"det_onnxruntime"}
    assert latency["det_tvm_over_best_peer_det"] == latency["det_tvm_ms"] / latency["det_onnxruntime_ms"]
    entry = outcome.profile["mlp"]["batch_2"]
    assert set(entry["memory"]) == {"pfp", "det"}
    assert entry["memory"]["pfp"]["weight_bytes"] > entry["memory"]["det"]["weight_bytes"] > 0
    assert entry["pfp_operators"] and all(row["ms"] >= 0 for row in entry["pfp_operators"])
    assert [str(p) for p in outcome.plots] == ["plots/benchmark/mlp/latency.png"] and outcome.plots[0].is_file()
    check_serving(outcome, config)
    assert os.environ.get("TVM_NUM_THREADS") == threads_before  # the thread switching is undone


def check_serving(outcome, config):
    import pfp_runtime

    assert str(outcome.serving_path) == "metrics/serving.json"
    assert json.loads(outcome.serving_path.read_text()) == json.loads(json.dumps(outcome.serving))
    serving = outcome.serving["models"]["mlp"]
    compiled = {"pfp_runtime", "det_twin", "svi_compiled"}
    for condition in ("quiet", "busy"):
        for batch in (1, 2):
            figures = serving[condition][f"batch_{batch}"]
            assert set(figures) == compiled | {"svi_pyro"} | ({"pfp_bare"} if batch == 1 else set())
            for name, per_threads in figures.items():
                assert set(per_threads) == ({"torch_threads_1"} if name == "svi_pyro" else {"threads_1", "threads_2"})
                for stats in per_threads.values():
                    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
                    assert stats["requests"] >= config.serving_rounds and stats["images_per_s"] > 0
            for threads in (1, 2):
                ratios = serving["ratios"][condition][f"batch_{batch}"][f"threads_{threads}"]
                pfp = figures["pfp_runtime"][f"threads_{threads}"]
                assert ratios["svi_pyro_over_pfp"]["p99"] == figures["svi_pyro"]["torch_threads_1"]["p99_ms"] / pfp["p99_ms"]
                assert ratios["pfp_over_det_twin"]["p50"] == pfp["p50_ms"] / figures["det_twin"][f"threads_{threads}"]["p50_ms"]
                if batch == 1:
                    bare = figures["pfp_bare"][f"threads_{threads}"]
                    assert ratios["runtime_over_bare_pfp"]["p50"] == pfp["p50_ms"] / bare["p50_ms"]
        load = serving[condition]["load"]
        assert load["processes"] == (1 if condition == "busy" else 0) and len(load["pids"]) == load["processes"]
        for pid in load["pids"]:  # the busy process is gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    # the libraries as the tune stage left them: det at batch 2 only (batch 1 served padded), no svi, no pfp at batch 1
    contenders = serving["contenders"]
    assert contenders["det_twin.batch_1"] == {"batch_size": 2, "schedule": "tuned"}
    assert contenders["svi_compiled.batch_2"] == {"batch_size": 2, "schedule": "hand"}
    assert contenders["pfp_bare.batch_1"] == {"batch_size": 1, "schedule": "hand"}
    threads = outcome.serving["threads"]
    assert threads["chosen"] in (1, 2) and threads["current_default"] == pfp_runtime.DEFAULT_THREADS
    headline = outcome.serving["summary"]["mlp"]["busy"]["batch_1"]
    assert headline["pfp_runtime_p99_ms"] == serving["busy"]["batch_1"]["pfp_runtime"][f"threads_{threads['chosen']}"]["p99_ms"]
    head = serving["head_error"]
    assert head["reference"]["draws"] == 10_000 and head["reference"]["images"] == 24
    for name in ("probs", "mi", "sme"):
        assert head[name]["mean_abs"] <= head[name]["max_abs"] < 0.05


def test_serving_without_the_bundle_names_the_bundle_stage(tuned_workspace, tune_params, monkeypatch, tmp_path):
    from pfp.artifacts.trained import load_trained
    from pfp.data.idx import DataError
    from pfp.serving_bench import ServingModel, benchmark_serving

    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    trained = load_trained("mlp")
    inputs = ServingModel(trained.posterior, trained.pfp_model, 0.5, {}, tmp_path / "no-bundle", tmp_path, None)
    with pytest.raises(DataError, match="bundle@mlp"):
        benchmark_serving({"mlp": inputs}, BenchmarkConfig(**SERVING), tune_params, seed=0)
