"""Stage `benchmark` as a function: the tune stage's libraries timed beside the baselines,
latency and profile (memory, PFP operators) in the stage's layout."""

from __future__ import annotations

import json

from pfp.config import BenchmarkConfig, TuneParams, Variant
from pfp.stages import benchmark


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


def test_run_writes_latency_profile_and_plots(tuned_workspace, tune_params, monkeypatch):
    workspace, _ = tuned_workspace
    monkeypatch.chdir(workspace)
    config = BenchmarkConfig(batch_sizes=[2], svi_samples=3, repeat=1, warmup=0, tvm_number=1, tvm_repeat=1,
                             memory_variants=[Variant.PFP, Variant.DET])
    outcome = benchmark.run(["mlp"], config, tune_params, seed=1)
    assert (str(outcome.latency_path), str(outcome.profile_path)) == ("metrics/latency.json", "metrics/profile.json")
    assert json.loads(outcome.latency_path.read_text()) == json.loads(json.dumps(outcome.latency))
    assert json.loads(outcome.profile_path.read_text()) == json.loads(json.dumps(outcome.profile))
    latency = outcome.latency["mlp"]["batch_2"]
    assert latency["schedules"] == {"pfp": "tuned", "det": "tuned", "pfp_separate": "hand", "svi": "hand"}
    assert latency["pfp_tvm_ms"] > 0 and latency["pfp_torch_ms"] > 0 and latency["svi_pyro_ms"] > 0
    entry = outcome.profile["mlp"]["batch_2"]
    assert set(entry["memory"]) == {"pfp", "det"}
    assert entry["memory"]["pfp"]["weight_bytes"] > entry["memory"]["det"]["weight_bytes"] > 0
    assert entry["pfp_operators"] and all(row["ms"] >= 0 for row in entry["pfp_operators"])
    assert [str(p) for p in outcome.plots] == ["plots/mlp/benchmark/latency.png"] and outcome.plots[0].is_file()
