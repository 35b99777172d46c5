"""The serving benchmark's parts: interleaved rounds, latency figures, the competing load, ratios,
the thread choice and the uncertainty head's error (speed itself is never asserted: shared host)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pfp import metrics
from pfp import serving_bench as sb
from pfp.head import head_draws, head_reference


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_latency_stats_orders_percentiles_and_counts_images():
    samples = list(np.random.default_rng(0).exponential(2.0, 500)) + [40.0]
    stats = sb.latency_stats(samples, batch=100)
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= max(samples)
    assert stats["requests"] == 501
    assert stats["images_per_s"] == pytest.approx(100 * 501 / (sum(samples) / 1e3))
    assert stats["mean_ms"] == pytest.approx(np.mean(samples))


def test_rounds_visit_every_contender_in_turn_and_set_its_threads():
    calls, switches = [], []
    contenders = [sb.Contender(name, batch, lambda images, name=name: calls.append((name, images.shape[0])), threads)
                  for name, batch, threads in (("a", 1, 1), ("b", 1, 2), ("c", 3, 1))]
    contenders.append(sb.Contender("d", 3, lambda images: calls.append(("d", images.shape[0])), None, warm_each_turn=False))
    images = np.zeros((7, 28, 28), np.uint8)
    requests = {1: sb.request_batches(images, 1), 3: sb.request_batches(images, 3)}
    trace: list = []
    samples = sb.interleaved_rounds(contenders, requests, rounds=5, turn_ms=0.0, max_calls=4,
                                    set_threads=switches.append, trace=trace)
    keys = [c.key for c in contenders]
    assert [key for _, key in trace] == [key for r in range(5) for key in keys[r % 4:] + keys[:r % 4]]
    # one timed request per turn (the turn time is over after the first), plus an untimed one where warmed
    assert all(len(values) == 5 for values in samples.values()) and set(samples) == set(keys)
    assert all(v >= 0 for values in samples.values() for v in values)
    assert sum(name == "d" for name, _ in calls) == 5 and sum(name == "a" for name, _ in calls) == 10
    assert all(size == (3 if name in "cd" else 1) for name, size in calls)
    assert switches and all(a != b for a, b in zip(switches, switches[1:]))  # switched only on a change


def test_a_turn_stops_at_max_calls():
    contender = sb.Contender("a", 1, lambda images: None, 1)
    samples = sb.interleaved_rounds([contender], {1: sb.request_batches(np.zeros((2, 28, 28), np.uint8), 1)},
                                    rounds=2, turn_ms=10_000.0, max_calls=7, set_threads=lambda t: None)
    assert len(samples[contender.key]) == 14


def test_request_batches_cycle_through_the_images():
    images = np.arange(5, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    batches = sb.request_batches(images, 3, count=4)
    assert [list(b[:, 0, 0]) for b in batches] == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert all(b.flags.c_contiguous and b.dtype == np.uint8 for b in batches)


def test_the_busy_process_spins_during_the_block_and_is_gone_after():
    with sb.BusyLoad(1) as load:
        (process,) = load.processes
        assert _alive(process.pid) and process.poll() is None
        time.sleep(0.3)
    assert process.poll() is not None and not _alive(process.pid)
    assert load.report["processes"] == 1 and load.report["pids"] == [process.pid]
    assert 0 < load.report["cpu_share"][0] <= 1.05


def test_the_busy_process_is_stopped_when_the_block_fails():
    with pytest.raises(RuntimeError, match="boom"), sb.BusyLoad(1) as load:
        raise RuntimeError("boom")
    assert all(p.poll() is not None and not _alive(p.pid) for p in load.processes)


def test_no_busy_process_for_the_quiet_condition():
    with sb.BusyLoad(0) as load:
        assert load.processes == []
    assert load.report["pids"] == []


def _stats(p50: float, p99: float) -> dict:
    return {"p50_ms": p50, "p90_ms": (p50 + p99) / 2, "p99_ms": p99}


def test_ratios_follow_from_the_figures():
    figures = {"pfp_runtime": {"threads_1": _stats(0.05, 0.2), "threads_2": _stats(0.07, 3.0)},
               "det_twin": {"threads_1": _stats(0.02, 0.1), "threads_2": _stats(0.02, 0.4)},
               "svi_compiled": {"threads_1": _stats(0.3, 0.9), "threads_2": _stats(0.2, 1.0)},
               "pfp_bare": {"threads_1": _stats(0.04, 0.1), "threads_2": _stats(0.04, 0.2)},
               "svi_pyro": {"torch_threads_2": _stats(60.0, 90.0)}}
    out = sb.ratios(figures, 1, 1)
    assert out["svi_pyro_over_pfp"] == pytest.approx({"p50": 60.0 / 0.05, "p99": 90.0 / 0.2})
    assert out["svi_compiled_over_pfp"] == pytest.approx({"p50": 0.3 / 0.05, "p99": 0.9 / 0.2})
    assert out["pfp_over_det_twin"] == pytest.approx({"p50": 0.05 / 0.02, "p99": 0.2 / 0.1})
    overhead = out["runtime_over_bare_pfp"]
    assert overhead["p50"] == pytest.approx(1.25) and overhead["within_target"] and overhead["target"] == 1.5
    assert not sb.ratios(figures, 1, 2)["runtime_over_bare_pfp"]["within_target"]  # 0.07 / 0.04 > 1.5
    assert "runtime_over_bare_pfp" not in sb.ratios({k: v for k, v in figures.items() if k != "pfp_bare"}, 1, 1)


def _thread_figures(busy_p99: dict[int, float], quiet_p99: float = 1.0) -> dict:
    return {condition: {f"batch_{b}": {"pfp_runtime": {f"threads_{t}": _stats(0.1, p99 if condition == "busy" else quiet_p99)
                                                       for t, p99 in busy_p99.items()}} for b in (1, 100)}
            for condition in sb.CONDITIONS}


@pytest.mark.parametrize(("busy_p99", "chosen"), [({1: 4.6, 2: 8.0}, 1), ({1: 10.0, 2: 2.0}, 2), ({1: 1.05, 2: 1.0}, 1)])
def test_the_thread_choice_keeps_the_loaded_p99_lowest_and_prefers_fewer_threads(busy_p99, chosen):
    choice = sb.choose_threads({"mlp": _thread_figures(busy_p99)}, [1, 2], current_default=1, batches=[1, 100])
    assert choice["chosen"] == chosen and choice["matches_current_default"] == (chosen == 1)
    assert choice["score"][f"threads_{chosen}"] <= 1.1
    assert choice["figures"]["mlp"]["batch_1"]["threads_2"]["busy_p99_ms"] == busy_p99[2]
    assert "p99" in choice["rule"] and choice["reason"].startswith(f"{chosen} thread(s)")


def test_the_thread_choice_takes_the_worst_model():
    per_model = {"mlp": _thread_figures({1: 1.0, 2: 0.5}), "lenet": _thread_figures({1: 1.0, 2: 5.0})}
    assert sb.choose_threads(per_model, [1, 2], current_default=2, batches=[1])["chosen"] == 1


def test_sample_head_matches_the_metrics_module():
    logits = np.random.default_rng(1).normal(0, 3, (30, 8, 10))
    probs, mi, sme = sb.sample_head(logits)
    sample_probs = sb.softmax(logits)
    assert np.allclose(probs, sample_probs.mean(0))
    assert np.allclose(mi, metrics.mutual_information(sample_probs), atol=1e-9)
    assert np.allclose(sme, metrics.softmax_entropy(sample_probs), atol=1e-9)


def test_numpy_normalisation_is_the_pipelines():
    from pfp.data.dirty_mnist import normalise

    images = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    assert np.allclose(sb.normalise_numpy(images), normalise(images).numpy(), atol=1e-6)


class _Prediction:
    def __init__(self, **values):
        self.__dict__.update(values)


def test_head_error_is_measured_against_a_monte_carlo_reference():
    rng = np.random.default_rng(3)
    mean, var = rng.normal(0, 2, (40, 10)), rng.uniform(0.0, 4.0, (40, 10))
    good = head_reference(mean, var, head_draws(128, 10, seed=0), 1.3)  # what the compiled head computes
    error = sb.head_error(_Prediction(logit_mean=mean, logit_var=var, **good), 1.3, draws=10_000, seed=0)
    assert error["reference"]["draws"] == 10_000 and error["reference"]["images"] == 40
    assert error["probs"]["max_abs"] < 0.03 and error["mi"]["max_abs"] < 0.05 and error["sme"]["max_abs"] < 0.05
    assert error["probs"]["mean_abs"] <= error["probs"]["max_abs"]
    assert error["reference_noise"]["probs"]["max_abs"] < 0.02
    # the plug-in softmax of the mean (no variance) is far off where the logits are uncertain
    plug_in = sb.softmax(mean / 1.3)
    bad = sb.head_error(_Prediction(logit_mean=mean, logit_var=var, probs=plug_in, mi=np.zeros(40),
                                    sme=-(plug_in * np.log(plug_in)).sum(-1)), 1.3, draws=10_000, seed=0)
    assert bad["probs"]["max_abs"] > 3 * error["probs"]["max_abs"] and bad["mi"]["max_abs"] > 0.1


def test_serving_images_mix_the_three_test_sets():
    arrays = {f"{key}_x": np.full((5, 28, 28), value, np.uint8)
              for key, value in (("mnist_test", 1), ("ambiguous_test", 2), ("ood_test", 3))}
    images = sb.serving_images(arrays, 7)
    assert list(images[:, 0, 0]) == [1, 2, 3, 1, 2, 3, 1] and images.dtype == np.uint8


def test_the_summary_takes_the_chosen_thread_count():
    figures = {"pfp_runtime": {"threads_1": {**_stats(0.05, 0.2), "images_per_s": 2e4},
                               "threads_2": {**_stats(0.07, 3.0), "images_per_s": 1e4}},
               "det_twin": {"threads_1": _stats(0.02, 0.1), "threads_2": _stats(0.02, 0.4)},
               "svi_compiled": {"threads_1": _stats(0.3, 0.9), "threads_2": _stats(0.2, 1.0)},
               "svi_pyro": {"torch_threads_2": _stats(60.0, 90.0)}}
    entry = {condition: {"load": {}, "batch_1": figures} for condition in sb.CONDITIONS}
    entry["ratios"] = {condition: {"batch_1": {f"threads_{t}": sb.ratios(figures, 1, t) for t in (1, 2)}}
                       for condition in sb.CONDITIONS}
    row = sb.summary({"mlp": entry}, 2)["mlp"]["busy"]["batch_1"]
    assert row["pfp_runtime_p99_ms"] == 3.0 and row["pfp_runtime_images_per_s"] == 1e4
    assert row["svi_pyro_over_pfp_p50"] == pytest.approx(60.0 / 0.07)
