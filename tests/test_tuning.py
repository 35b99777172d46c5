"""TVM tuning (pfp.tuning): every variant x batch size compiled, recorded and exported; the
libraries compute what the PyTorch reference computes (hand schedules measured, no search)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from pfp.backends.base import Predictor  # noqa: E402
from pfp.backends.torch_ref import deterministic_forward, ensemble_forward, pfp_forward  # noqa: E402
from pfp.backends.weights import ensemble_weights  # noqa: E402
from pfp.config import TuneParams, Variant  # noqa: E402
from pfp.convert import convert_posterior  # noqa: E402
from pfp.data.idx import DataError  # noqa: E402
from pfp.tuning import guard_config, library_path, load_library, tune_config, tune_model  # noqa: E402

from .common import random_posterior  # noqa: E402

SCALE = 0.5


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    posterior = random_posterior("lenet")
    pfp_model = convert_posterior(posterior)
    params = TuneParams(batch_sizes=[2], variants=[Variant.PFP, Variant.DET, Variant.SVI], trials_per_task=0,
                        svi_samples=3, number=1, min_repeat_ms=1)
    out = tmp_path_factory.mktemp("workspace") / "models" / "lenet" / "tvm"  # the stage's layout
    libraries = tune_model(posterior, pfp_model, params, out, variance_scale=SCALE, seed=3)
    return posterior, pfp_model, params, out, libraries


def test_every_variant_and_batch_is_written(tuned):
    _, _, params, out, libraries = tuned
    assert [(lib.variant, lib.batch_size) for lib in libraries] == [(v, 2) for v in params.variants]
    for lib in libraries:
        assert lib.path == library_path(out, "host", lib.variant, 2) and lib.path.is_file()
        assert (lib.path.parent / f"{lib.variant.value}_b2" / "database_tuning_record.json").stat().st_size > 0
        assert not (lib.path.parent / f"{lib.variant.value}_b2" / "logs").exists()
        # no search: every task runs its measured hand schedule
        assert lib.report["tasks"] and all(row["kept"] == "hand" and row["hand_ms"] > 0 for row in lib.report["tasks"])
        info = json.loads((lib.path.parent / f"{lib.path.name}.json").read_text())["info"]
        assert info["variant"] == lib.variant.value and info["variance_scale"] == SCALE


def test_libraries_compute_the_reference(tuned):
    posterior, pfp_model, _, out, _ = tuned
    x = torch.randn(5, *posterior.spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # PFP in the converted layer order; the twin and the ensemble (also built in that order)
        # against the trained one: the same functions
        assert pfp_model.spec != posterior.spec
        ref_mean, ref_var = pfp_forward(pfp_model.spec, pfp_model.params, x, variance_scale=SCALE)
        ref_det = deterministic_forward(posterior.spec, posterior.mean_weights(), x)
        ref_svi = ensemble_forward(posterior.spec, ensemble_weights(posterior, 3, seed=3), x[:2])
    mean, var = load_library(out, "host", Variant.PFP, 2, model="lenet").predict(x.numpy())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-8)
    (det,) = load_library(out, "host", Variant.DET, 2, model="lenet").predict(x.numpy())
    np.testing.assert_allclose(det, ref_det, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load_library(out, "host", Variant.SVI, 2, model="lenet")(x[:2].numpy()), ref_svi, rtol=1e-4, atol=1e-6)
    (svi,) = load_library(out, "host", Variant.SVI, 2, model="lenet").predict(x.numpy())  # any number of examples, members first
    np.testing.assert_allclose(svi[:, :2], ref_svi, rtol=1e-4, atol=1e-6)


def test_libraries_are_predictors_that_describe_their_provenance(tuned):
    _, _, _, out, _ = tuned
    library = load_library(out, "host", Variant.SVI, 2, model="lenet")
    assert isinstance(library, Predictor)
    info = library.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["backend"] == "tvm" and info["kind"] == "ensemble" and info["schedule"] == "tuned"
    assert info["variance_scale"] == SCALE and info["svi_samples"] == 3 and info["seed"] == 3 and info["batch_size"] == 2


def test_reports_say_which_board_measured_what(tuned):
    """The local runner: one measurement at a time on board "local", every hand schedule once, no search."""
    *_, libraries = tuned
    for lib in libraries:
        report = lib.report
        measured = [row for row in report["tasks"] if row["hand_ms"] is not None]
        assert report["rpc_workers"] == 1 and report["boards"] == {"local": len(measured)}
        assert [(m["phase"], m["board"]) for m in report["measurements"]] == [("hand", "local")] * len(measured)
        assert sorted(m["task"] for m in report["measurements"]) == sorted(row["task"] for row in measured)
        assert {m["task"]: m["ms"] for m in report["measurements"]} == pytest.approx(
            {row["task"]: row["hand_ms"] for row in measured})
        assert report["search_trials"] == 0 and report["trials_per_second"] is None
        assert report["most_at_once"] == 0 and report["measuring_seconds"] == 0  # the local runner has no sessions
        json.dumps(report)  # it goes into the stage's summary as it is


def test_second_run_resumes_from_the_recorded_measurements(tuned):
    posterior, pfp_model, params, out, first = tuned
    again = tune_model(posterior, pfp_model, params, out, variance_scale=SCALE, seed=3)
    for before, after in zip(first, again):
        assert after.report["records"] == before.report["records"]  # hand schedules not measured twice
        assert [row["hand_ms"] for row in after.report["tasks"]] == [row["hand_ms"] for row in before.report["tasks"]]
        assert after.report["measurements"] == []  # nothing measured again


def test_missing_library_names_the_stage(tmp_path):
    with pytest.raises(DataError, match="run the tune stage first"):
        load_library(tmp_path, "host", Variant.PFP, 1, model="lenet")


def test_tune_config_takes_every_knob_of_the_params():
    params = TuneParams(trials_per_task=40, max_trials_global=500, max_trials_per_iter=8, repeat=2, genetic_num_iters=3,
                        population_size=12, max_init_unmeasured=20, search_seed=None, search_threads=1,
                        builder_timeout_sec=30.0, builder_workers=2, lean_builder=False, runner_timeout_sec=9.0,
                        session_timeout_sec=7.0)
    config = tune_config(params, Path("work"))
    assert (config.trials_per_task, config.max_trials_global, config.num_trials_per_iter, config.repeat) == (40, 500, 8, 2)
    assert (config.genetic_num_iters, config.population_size, config.init_min_unmeasured) == (3, 12, 12)
    assert (config.seed, config.num_threads, config.builder_timeout_sec, config.builder_workers) == (None, 1, 30.0, 2)
    assert (config.lean_builder, config.runner_timeout_sec, config.session_timeout_sec) == (False, 9.0, 7.0)
    assert config.work_dir == "work" and config.search


def test_tune_config_defaults_are_the_former_constants():
    config = tune_config(TuneParams(trials_per_task=0, population_size=64), Path("work"))
    assert (config.trials_per_task, config.max_trials_global, config.num_trials_per_iter, config.repeat) == (1, 100_000, 1, 1)
    assert (config.genetic_num_iters, config.init_min_unmeasured, config.seed, config.num_threads) == (2, 16, 0, "physical")
    assert (config.builder_timeout_sec, config.builder_workers, config.lean_builder) == (300.0, None, True)
    assert (config.runner_timeout_sec, config.session_timeout_sec) == (60.0, 60.0) and not config.search


# --------------------------------------------------------------------------- the whole-model guard

def _seed_record(work_dir: Path, mod, task_name: str, edit) -> None:
    """Commit to ``work_dir``'s database a record of ``task_name`` scheduled by ``edit(sch)``, recorded as
    taking 1 ns (so compiling from the database picks it whatever it really costs)."""
    from tvm.s_tir import meta_schedule as ms

    from pfp.backends.tvm.targets import make_target
    from pfp.backends.tvm.tuning.records import open_database
    from pfp.backends.tvm.tuning.search import extract_tuning_tasks

    target = make_target("host")
    (task,) = [task for task in extract_tuning_tasks(mod, target) if task.task_name == task_name]
    func_mod = task.dispatched[0]
    from tvm import s_tir

    sch = s_tir.Schedule(func_mod)
    edit(sch, target)
    database = open_database(work_dir)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(func_mod), [1e-9], target, ms.arg_info.ArgInfo.from_prim_func(func_mod["main"])))


def _reduction_outermost(sch, _target) -> None:
    """A deliberately bad schedule of the first dense layer: the reduction loop outermost, serial and scalar
    (each weight read strided; about 3-4x the hand schedule's time at batch 10)."""
    b, o, k = sch.get_loops(sch.get_sblock("dense_joint_first_acc"))
    sch.reorder(k, o, b)


def _hand_plus_a_no_op(sch, target) -> None:
    """The hand schedule and one instruction that changes nothing: another record, the same code."""
    from pfp.backends.tvm.schedules import apply_hand_schedule

    apply_hand_schedule(sch, target=target)
    sch.sample_categorical(candidates=[1], probs=[1.0])


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A real tuning run (no search, no run-off: the database's best record per task compiles) of an MLP whose
    PFP database holds a slow schedule of its first layer and whose twin's holds its hand schedule again."""
    from pfp.backends.tvm.predictor import build_variant_module

    posterior = random_posterior("mlp")
    pfp_model = convert_posterior(posterior)
    # never "busy" (other processes cannot use more than all cores): the decision here is the figures'
    params = TuneParams(batch_sizes=[10], variants=[Variant.PFP, Variant.DET], trials_per_task=0, finalists=0,
                        number=1, min_repeat_ms=1, guard_rounds=9, guard_margin=0.25, guard_busy_fraction=1.5)
    out = tmp_path_factory.mktemp("guarded") / "tvm"
    options = {"batch_size": 10, "variance_scale": SCALE, "seed": 3, "svi_samples": params.svi_samples}
    _seed_record(out / "host" / "pfp_b10", build_variant_module(Variant.PFP, pfp_model, posterior, **options),
                 "fc1_dense_joint_first", _reduction_outermost)
    _seed_record(out / "host" / "det_b10", build_variant_module(Variant.DET, pfp_model, posterior, **options),
                 "fused_fc1_dense_relu2", _hand_plus_a_no_op)
    libraries = tune_model(posterior, pfp_model, params, out, variance_scale=SCALE, seed=3)
    return out, {lib.variant: lib for lib in libraries}


@pytest.mark.quiet_host  # times the host: `make test` runs it after the parallel part, alone
def test_guard_keeps_the_hand_build_when_the_tuned_module_is_slower(guarded):
    out, libraries = guarded
    lib = libraries[Variant.PFP]
    guard = lib.report["guard"]
    assert "earlier_hand" in lib.kept_counts() and lib.kept_counts()["earlier_hand"] == 1  # the seeded record compiled
    assert guard["kept"] == "hand" and not guard["identical"] and guard["runner"] == "local"
    assert guard["ratio"] == pytest.approx(guard["tuned_ms"] / guard["hand_ms"]) and guard["ratio"] > 1.5
    assert 0.001 < guard["hand_ms"] < 5 and guard["rounds"] == 9 and len(guard["attempts"][-1]["samples_ms"]["hand"]) == 9
    # the exported library is the hand build, and runs at the hand build's speed
    library = load_library(out, "host", Variant.PFP, 10, model="mlp")
    info = library.describe()
    assert info["schedule"] == "hand" and info["guard"]["kept"] == "hand" and info["guard"]["tuned_ms"] == guard["tuned_ms"]
    shipped = np.median([library.time(number=200, repeat=1)["median_ms"] for _ in range(5)])
    assert shipped < (guard["tuned_ms"] * guard["hand_ms"]) ** 0.5


@pytest.mark.quiet_host  # times the host: `make test` runs it after the parallel part, alone
def test_guard_keeps_the_tuned_module_when_it_is_as_fast(guarded):
    out, libraries = guarded
    lib = libraries[Variant.DET]
    guard = lib.report["guard"]
    assert lib.kept_counts()["earlier_hand"] == 1 and not guard["identical"]
    assert guard["kept"] == "tuned" and 0.75 < guard["ratio"] <= 1.25 and guard["host_busy"] is False
    assert load_library(out, "host", Variant.DET, 10, model="mlp").describe()["schedule"] == "tuned"


def test_guard_figures_are_in_the_report_and_the_metadata(guarded, tuned):
    out, libraries = guarded
    for lib in [*libraries.values(), *tuned[-1]]:
        guard = lib.report["guard"]
        assert guard["tuned_ms"] > 0 and guard["hand_ms"] > 0 and guard["kept"] in ("tuned", "hand")
        evidence = guard["busy_evidence"]
        assert guard["host_busy"] == evidence["busy"] and 0 <= evidence["other_cpu_fraction"] <= 1.0
        assert evidence["own_cpu_seconds"] > 0 and evidence["cores"] >= 1
        json.dumps(lib.as_dict())
        meta = json.loads(Path(f"{lib.path}.json").read_text())["info"]["guard"]
        assert meta["kept"] == guard["kept"] and meta["hand_ms"] > 0
        if lib in libraries.values():  # (the `tuned` libraries were exported again by the resume test)
            assert meta["hand_ms"] == guard["hand_ms"] and meta["tuned_ms"] == guard["tuned_ms"]
    for lib in tuned[-1]:  # no search: every task kept its hand schedule, the tuned module is the hand build
        assert lib.report["guard"]["identical"] and lib.report["guard"]["kept"] == "tuned"
        assert lib.report["guard"]["ratio"] == 1.0 and len(lib.report["guard"]["attempts"]) == 1


def test_shipped_libraries_load_quietly_and_nothing_staged_is_left(guarded):
    """Reported: libraries exported after the guard had run them carried the executable's memory scopes,
    and every load printed 'Warning: Scope Loaded' lines (hundreds per evaluate / benchmark stage)."""
    import subprocess
    import sys

    out, libraries = guarded
    assert not [p.name for p in (out / "host").iterdir() if p.name.startswith(".")], "staged builds left behind"
    for lib in libraries.values():
        loaded = subprocess.run([sys.executable, "-c", f"from pfp.backends import base; base.load({str(lib.path)!r})"],
                                capture_output=True, text=True, timeout=120, check=True)
        assert "Scope" not in loaded.stderr, loaded.stderr[-500:]


def test_guard_config_takes_the_params():
    config = guard_config(TuneParams(guard_rounds=4, guard_margin=0.1, guard_busy_fraction=0.5, guard_busy_retries=0,
                                     guard_busy_wait_sec=1.0, guard_turn_ms=20.0))
    assert (config.rounds, config.margin, config.busy_fraction, config.busy_retries) == (4, 0.1, 0.5, 0)
    assert (config.busy_wait_sec, config.turn_ms, config.rpc_tracker) == (1.0, 20.0, None)
