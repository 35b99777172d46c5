"""Serving benchmark: what a user serving a model sees, from raw uint8 images to an answer.

Contenders, each timed per request (``serve(images)`` on a batch of raw uint8 images (B, 28, 28)):

* ``pfp_runtime``: the runtime bundle predictor (:func:`pfp_runtime.load_bundle`): normalisation,
  one compiled call per chunk with PFP, temperature and the uncertainty head (probabilities, MI, SME);
* ``det_twin``: the tune stage's deterministic twin library + normalisation + numpy softmax;
* ``svi_compiled``: the tune stage's 30-member ensemble library + normalisation + numpy softmax/MI;
* ``svi_pyro``: Pyro's ``Predictive`` with the trained guide (30 samples) + normalisation + softmax/MI;
* ``pfp_bare`` (batch 1): the tune stage's PFP library, its ``main`` on a prepared input tensor
  (no normalisation, no head, no output conversion): the floor the runtime is measured against.

All of them run in one process in interleaved rounds (each round gives every contender a turn,
the order rotated from round to round) so that load bursts of the shared host hit them alike,
once on the host as it is (``quiet``) and once with a competing process spinning on one core
(``busy``, :class:`BusyLoad`). The TVM contenders run once per thread count of the TVM thread
pool (process-wide, switched before each turn); Pyro runs on torch's threads.

Figures per (condition, batch, contender, threads): p50/p90/p99 milliseconds per request and
images per second (:func:`latency_stats`). From them: the ratios of :func:`ratios`, the runtime's
thread choice (:func:`choose_threads`), and, separately, the uncertainty head's error against a
Monte-Carlo reference (:func:`head_error`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.infer import Predictive

import pfp_runtime
from pfp.backends import base
from pfp.backends.base import Backend, Predictor, Schedule
from pfp.bench import guide_from_posterior
from pfp.bnn import Posterior, make_model
from pfp.config import BenchmarkConfig, CompileTarget, TuneParams, Variant
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import MNIST_MEAN, MNIST_STD, normalise
from pfp.data.idx import DataError
from pfp.head import monte_carlo_reference
from pfp.tuning import library_path, load_library
from pfp_runtime import _tvm as runtime_tvm

__all__ = ["CONDITIONS", "BusyLoad", "Contender", "choose_threads", "head_error", "interleaved_rounds", "latency_stats",
           "model_contenders", "ratios", "request_batches", "sample_head", "serve_model", "softmax"]

#: the load conditions, in the order they are measured
CONDITIONS = ("quiet", "busy")
#: a competing process's work: one core kept busy
BUSY_LOOP = "while True:\n    pass\n"
#: the runtime's p50 latency over the bare compiled call at batch 1 should stay within this factor
RUNTIME_OVERHEAD_TARGET = 1.5
#: more threads must cut the loaded p99 by more than this fraction to be chosen
THREAD_TOLERANCE = 0.10


# --------------------------------------------------------------------------- numpy heads (what a user writes)

def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1)


def sample_head(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, mutual information and softmax entropy of sampled logits (S, N, C)."""
    sample_probs = softmax(logits)
    probs = sample_probs.mean(axis=0)
    sme = _entropy(probs)
    return probs, np.maximum(sme - _entropy(sample_probs).mean(axis=0), 0.0), sme


def normalise_numpy(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) with MNIST's mean/std (as the pipeline normalises)."""
    x = images.astype(np.float32)[:, None]
    x *= np.float32(1.0 / (255.0 * MNIST_STD))
    x -= np.float32(MNIST_MEAN / MNIST_STD)
    return x


# --------------------------------------------------------------------------- contenders

@dataclass
class Contender:
    """One way to serve a request: ``serve(images)`` on raw uint8 images (B, 28, 28)."""

    name: str
    batch: int
    serve: Callable[[np.ndarray], object]
    threads: int | None = None  # TVM thread-pool size it runs with; None: not TVM (Pyro: torch's threads)
    warm_each_turn: bool = True  # an untimed call opens each turn (caches, a switched thread pool)
    label: str = ""  # what it runs on when not TVM (``torch_threads_N``)

    @property
    def key(self) -> tuple[str, int, str]:
        return self.name, self.batch, f"threads_{self.threads}" if self.threads is not None else self.label or "threads"


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    out = runtime_tvm.aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


def _serving_library(folder: Path, tune: TuneParams, variant: Variant, batch: int, *, model: str,
                     made_from: Mapping[str, str], build: Callable[[Variant, int], Predictor],
                     exact: bool = False) -> tuple[Predictor, Path | None, dict]:
    """The tune stage's host library a user would serve ``batch`` images with, else one built here (hand schedules).

    The library of exactly ``batch``, else (unless ``exact``) the largest smaller one (``predict``
    chunks), else the smallest. The path is None for a library built here (not exported).
    """
    sizes = sorted(size for size in tune.batch_sizes if tune.target is CompileTarget.HOST
                   and library_path(folder, tune.target, variant, size).is_file() and (size == batch or not exact))
    if sizes:
        size = batch if batch in sizes else max([s for s in sizes if s < batch], default=sizes[0])
        library = load_library(folder, tune.target, variant, size, model=model, made_from=made_from)
        return library, library_path(folder, tune.target, variant, size), {"batch_size": size, "schedule": "tuned"}
    return build(variant, batch), None, {"batch_size": batch, "schedule": "hand"}


def _bare_machine(library: Predictor, path: Path | None) -> runtime_tvm.Machine:
    """The library's Relax VM as the runtime drives it (a library built here is exported to a temporary folder first)."""
    if path is not None:
        return runtime_tvm.Machine(path)
    with tempfile.TemporaryDirectory(prefix="pfp-serving-") as folder:
        return runtime_tvm.Machine(library.export(Path(folder) / "pfp_b1.so"))


def model_contenders(posterior: Posterior, pfp_model: PFPModel, bundle: pfp_runtime.Predictor, tvm_folder: Path,
                     tune: TuneParams, config: BenchmarkConfig, *, made_from: Mapping[str, str], variance_scale: float,
                     seed: int, prepared: np.ndarray) -> tuple[list[Contender], dict]:
    """Every contender of one model at every batch size and thread count; and what each runs (libraries)."""
    model = posterior.spec.name
    options = {"variance_scale": variance_scale, "svi_samples": config.svi_samples, "seed": seed}

    def build(variant: Variant, batch: int) -> Predictor:
        return base.create(Backend.TVM, variant, pfp_model, posterior, batch_size=batch, schedule=Schedule.HAND, **options)

    torch_model = make_model(posterior.spec, prior_scale=1.0)
    guide = guide_from_posterior(posterior, torch_model, normalise(prepared[:1]))
    predictive = Predictive(torch_model, guide=guide, num_samples=config.svi_samples, return_sites=("_RETURN",))

    def serve_pyro(images: np.ndarray):
        with torch.no_grad():
            logits = predictive(normalise(images))["_RETURN"]
        return sample_head(logits.numpy())

    contenders: list[Contender] = []
    described: dict[str, Any] = {"pfp_runtime": bundle.describe(), "svi_pyro": {"torch_threads": torch.get_num_threads(),
                                                                               "samples": config.svi_samples}}
    for batch in config.serving_batch_sizes:
        twin, _, described[f"det_twin.batch_{batch}"] = _serving_library(
            tvm_folder, tune, Variant.DET, batch, model=model, made_from=made_from, build=build)
        ensemble, _, described[f"svi_compiled.batch_{batch}"] = _serving_library(
            tvm_folder, tune, Variant.SVI, batch, model=model, made_from=made_from, build=build)

        def serve_twin(images: np.ndarray, twin=twin):
            probs = softmax(twin.predict(normalise_numpy(images))[0])
            return probs, probs.argmax(axis=1)

        def serve_ensemble(images: np.ndarray, ensemble=ensemble):
            return sample_head(ensemble.predict(normalise_numpy(images))[0])

        for threads in config.serving_threads:
            contenders += [Contender("pfp_runtime", batch, bundle.predict, threads),
                           Contender("det_twin", batch, serve_twin, threads),
                           Contender("svi_compiled", batch, serve_ensemble, threads)]
        if batch == 1:
            bare, path, described["pfp_bare.batch_1"] = _serving_library(
                tvm_folder, tune, Variant.PFP, 1, model=model, made_from=made_from, build=build, exact=True)
            machine = _bare_machine(bare, path)
            tensor = runtime_tvm.Machine.tensor(_aligned_copy(normalise_numpy(prepared[:1])))
            for threads in config.serving_threads:
                contenders.append(Contender("pfp_bare", 1, lambda _images, m=machine, t=tensor: m.main(t), threads))
        contenders.append(Contender("svi_pyro", batch, serve_pyro, None, warm_each_turn=False,
                                    label=f"torch_threads_{torch.get_num_threads()}"))
    return contenders, described


# --------------------------------------------------------------------------- measuring

def request_batches(images: np.ndarray, batch: int, count: int = 16) -> list[np.ndarray]:
    """``count`` requests of ``batch`` raw images each, cycling through ``images`` (contiguous copies)."""
    index = np.arange(batch * count) % len(images)
    return [np.ascontiguousarray(images[index[i * batch:(i + 1) * batch]]) for i in range(count)]


def interleaved_rounds(contenders: Sequence[Contender], requests: Mapping[int, Sequence[np.ndarray]], *, rounds: int,
                       turn_ms: float, max_calls: int, set_threads: Callable[[int], None],
                       trace: list | None = None) -> dict[tuple, list[float]]:
    """Per-request milliseconds of each contender (by :attr:`Contender.key`) over ``rounds`` rounds.

    Each round gives every contender one turn, the order rotated by one each round; a turn is an
    untimed call (``warm_each_turn``), then timed requests until ``turn_ms`` have passed (at
    least one, at most ``max_calls``). The TVM thread pool is set to a contender's ``threads``
    before its turn (when it changes). ``trace`` collects ``(round, key)`` of each turn.
    """
    samples: dict[tuple, list[float]] = {c.key: [] for c in contenders}
    cursor = dict.fromkeys(requests, 0)
    current = None
    for round_index in range(rounds):
        shift = round_index % len(contenders)
        for contender in list(contenders[shift:]) + list(contenders[:shift]):
            if contender.threads is not None and contender.threads != current:
                set_threads(contender.threads)
                current = contender.threads
            pool = requests[contender.batch]
            if contender.warm_each_turn:
                contender.serve(pool[cursor[contender.batch] % len(pool)])
            times = samples[contender.key]
            deadline = time.perf_counter() + turn_ms / 1e3
            for _ in range(max_calls):
                images = pool[cursor[contender.batch] % len(pool)]
                cursor[contender.batch] += 1
                start = time.perf_counter()
                contender.serve(images)
                end = time.perf_counter()
                times.append((end - start) * 1e3)
                if end >= deadline:
                    break
            if trace is not None:
                trace.append((round_index, contender.key))
    return samples


def latency_stats(samples_ms: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p90/p99 and mean milliseconds per request, images per second, and the request count."""
    values = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(values.mean()),
            "images_per_s": float(batch * len(values) / (values.sum() / 1e3)), "requests": int(len(values))}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BusyLoad:
    """Competing processes, each spinning a busy loop on one core, for the duration of a ``with`` block.

    On exit each is terminated (killed if it does not stop) and waited for; :attr:`report` then
    holds how much CPU they got (``cpu_share``: CPU seconds per wall second, per process).
    """

    def __init__(self, processes: int = 1) -> None:
        self.count = processes
        self.processes: list[subprocess.Popen] = []
        self.report: dict[str, Any] = {"processes": processes}

    def __enter__(self) -> BusyLoad:
        self._start = time.perf_counter()
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3 if self.count else 0.0)  # interpreter start-up: spinning before the first request
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        shares = []
        for process in self.processes:
            try:
                shares.append(_cpu_seconds(process.pid) / wall)
            except (OSError, IndexError, ValueError):
                shares.append(float("nan"))
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.report.update({"pids": [p.pid for p in self.processes], "cpu_share": shares, "seconds": wall})


# --------------------------------------------------------------------------- what the figures say

def _stats_of(figures: Mapping, name: str, threads: int | None) -> dict:
    entry = figures[name]
    return entry[f"threads_{threads}"] if threads is not None else next(iter(entry.values()))


def ratios(figures: Mapping[str, Mapping[str, dict]], batch: int, threads: int) -> dict[str, dict]:
    """Latency ratios (p50 and p99) of one condition and batch size at one TVM thread count.

    ``X_over_pfp``: contender X's latency over the runtime predictor's (how many times slower);
    ``pfp_over_det_twin``: the runtime's over the twin's (the price of the uncertainty);
    ``runtime_over_bare_pfp`` (batch 1): the runtime predictor over the bare compiled PFP call.
    """
    pfp = _stats_of(figures, "pfp_runtime", threads)

    def ratio(top: dict, bottom: dict) -> dict:
        return {"p50": top["p50_ms"] / bottom["p50_ms"], "p99": top["p99_ms"] / bottom["p99_ms"]}

    out = {"svi_pyro_over_pfp": ratio(_stats_of(figures, "svi_pyro", None), pfp),
           "svi_compiled_over_pfp": ratio(_stats_of(figures, "svi_compiled", threads), pfp),
           "pfp_over_det_twin": ratio(pfp, _stats_of(figures, "det_twin", threads))}
    if batch == 1 and "pfp_bare" in figures:
        overhead = ratio(pfp, _stats_of(figures, "pfp_bare", threads))
        out["runtime_over_bare_pfp"] = {**overhead, "target": RUNTIME_OVERHEAD_TARGET,
                                        "within_target": overhead["p50"] <= RUNTIME_OVERHEAD_TARGET}
    return out


def choose_threads(per_model: Mapping[str, Mapping[str, Mapping[str, Mapping]]], candidates: Sequence[int], *,
                   current_default: int, batches: Sequence[int]) -> dict[str, Any]:
    """The runtime's thread count: the fewest whose p99 with a core kept busy stays within 10 % of the best.

    ``per_model[model][condition][f"batch_{B}"]["pfp_runtime"][f"threads_{T}"]`` are the figures of
    :func:`serve_model`. A thread count's score is its loaded p99 over the best count's, worst over
    the models and ``batches``; the fewest threads with a score <= 1.1 win (else the lowest score):
    a request on one core does not wait for a thread that the competing process holds off its core.
    """
    def stat(model: str, condition: str, batch: int, threads: int, quantile: str) -> float:
        return per_model[model][condition][f"batch_{batch}"]["pfp_runtime"][f"threads_{threads}"][f"{quantile}_ms"]

    score = {t: max(stat(m, "busy", b, t, "p99") / min(stat(m, "busy", b, u, "p99") for u in candidates)
                    for m in per_model for b in batches) for t in candidates}
    near = [t for t in candidates if score[t] <= 1 + THREAD_TOLERANCE]
    chosen = min(near) if near else min(candidates, key=lambda t: score[t])
    figures = {m: {f"batch_{b}": {f"threads_{t}": {f"{c}_{q}_ms": stat(m, c, b, t, q) for c in CONDITIONS for q in ("p50", "p99")}
                                  for t in candidates} for b in batches} for m in per_model}
    described = "; ".join(
        f"{m} batch {b}: " + ", ".join(f"{t} thread(s) p99 {stat(m, 'busy', b, t, 'p99'):.3f} ms busy / "
                                       f"{stat(m, 'quiet', b, t, 'p99'):.3f} ms quiet" for t in candidates)
        for m in per_model for b in batches)
    return {"chosen": chosen, "current_default": current_default, "matches_current_default": chosen == current_default,
            "score": {f"threads_{t}": score[t] for t in candidates}, "figures": figures,
            "rule": "per thread count, its p99 with one core kept busy over the best count's, worst over the models and "
                    f"batch sizes (the score); the fewest threads with a score <= {1 + THREAD_TOLERANCE:.2f} win",
            "reason": f"{chosen} thread(s): score {score[chosen]:.2f} (" + ", ".join(f"{t}: {score[t]:.2f}" for t in candidates)
                      + f"); {described}"}


def head_error(prediction: Any, temperature: float, *, draws: int, seed: int) -> dict[str, Any]:
    """Errors of a bundle's probs/MI/SME against a ``draws``-draw Monte-Carlo estimate over its own Gaussian logits.

    The reference (:func:`pfp.head.monte_carlo_reference`, float64 numpy): z = (logit_mean +
    sqrt(logit_var) eps) / temperature with independent eps ~ N(0, 1); probs = E[softmax z],
    SME = H[probs], MI = SME - E[H[softmax z]]. ``reference_noise`` is the same error between two
    such references (seeds ``seed`` and ``seed + 1``): below it an error is not resolved.
    """
    mean, var = np.asarray(prediction.logit_mean, np.float64), np.asarray(prediction.logit_var, np.float64)
    reference = monte_carlo_reference(mean, var, temperature, draws=draws, seed=seed)
    second = monte_carlo_reference(mean, var, temperature, draws=draws, seed=seed + 1)

    def errors(estimate: Mapping[str, np.ndarray] | Any, truth: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        out = {}
        for name in ("probs", "mi", "sme"):
            value = estimate[name] if isinstance(estimate, Mapping) else getattr(estimate, name)
            diff = np.abs(np.asarray(value, np.float64) - truth[name])
            out[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
        return out

    return {**errors(prediction, reference), "reference_noise": errors(second, reference),
            "reference": {"draws": draws, "images": int(len(mean)), "temperature": float(temperature), "seed": seed,
                          "mi_mean": float(reference["mi"].mean()), "sme_mean": float(reference["sme"].mean())}}


# --------------------------------------------------------------------------- one model

@dataclass
class ServingSetup:
    """What :func:`serve_model` needs of one model besides its contenders."""

    contenders: list[Contender]
    images: np.ndarray  # raw uint8 (N, 28, 28): requests cycle through them
    set_threads: Callable[[int], None] = runtime_tvm.configure_threads
    loads: dict[str, int] = field(default_factory=lambda: {"quiet": 0, "busy": 1})


def serve_model(setup: ServingSetup, config: BenchmarkConfig) -> dict[str, Any]:
    """Every contender's figures under each load condition: ``{condition: {"load": ..., "batch_B": {name: {threads_T: stats}}}}``."""
    requests = {batch: request_batches(setup.images, batch) for batch in {c.batch for c in setup.contenders}}
    out: dict[str, Any] = {}
    for condition in CONDITIONS:
        before = os.getloadavg()
        with BusyLoad(setup.loads[condition]) as load:
            for contender in setup.contenders:  # first calls (allocations, pools) before any timing
                for _ in range(config.serving_warmup):
                    if contender.threads is not None:
                        setup.set_threads(contender.threads)
                    contender.serve(requests[contender.batch][0])
            samples = interleaved_rounds(setup.contenders, requests, rounds=config.serving_rounds,
                                         turn_ms=config.serving_turn_ms, max_calls=config.serving_max_calls,
                                         set_threads=setup.set_threads)
        entry: dict[str, Any] = {"load": {**load.report, "loadavg_before": list(before), "loadavg_after": list(os.getloadavg())}}
        for (name, batch, threads), values in samples.items():
            entry.setdefault(f"batch_{batch}", {}).setdefault(name, {})[threads] = latency_stats(values, batch)
        out[condition] = entry
    return out


# --------------------------------------------------------------------------- every model

@dataclass
class ServingModel:
    """One model's inputs to the serving benchmark (the stage reads them from the workspace)."""

    posterior: Posterior
    pfp_model: PFPModel
    variance_scale: float
    made_from: dict[str, str]
    bundle: Path  # the runtime bundle folder for this host
    tvm_folder: Path  # the tune stage's libraries (models/MODEL/tvm)
    images: np.ndarray  # raw uint8 (N, 28, 28): requests and the head-error images


def benchmark_serving(models: Mapping[str, ServingModel], config: BenchmarkConfig, tune: TuneParams, *,
                      seed: int) -> dict[str, Any]:
    """metrics/serving.json: per model the figures, ratios and head error; the runtime's thread choice."""
    saved_threads, saved_torch = os.environ.get("TVM_NUM_THREADS"), torch.get_num_threads()
    if config.serving_torch_threads is not None:
        torch.set_num_threads(config.serving_torch_threads)
    report: dict[str, Any] = {"host": {"cpus": len(os.sched_getaffinity(0)), "loadavg_start": list(os.getloadavg()),
                                       "torch_threads": torch.get_num_threads()},
                              "settings": {key: value for key, value in config.model_dump(mode="json").items()
                                           if key.startswith(("serving_", "head_")) or key == "svi_samples"},
                              "models": {},
                              "notes": {"latency": "ms per request, raw uint8 images to the contender's answer, one request at a time",
                                        "images_per_s": "batch x requests / seconds spent in them (closed loop)",
                                        "ratios": "latency of the first named over the second's (p50, p99)",
                                        "busy": "a subprocess spinning a busy loop, started before and stopped after the rounds"}}
    try:
        for model, inputs in models.items():
            print(f"serving benchmark {model} ...", flush=True)
            try:
                bundle = pfp_runtime.load_bundle(inputs.bundle, expected_model=model, threads=config.serving_threads[0])
            except pfp_runtime.BundleError as error:
                raise DataError(f"{error} (the serving benchmark runs the bundle@{model} stage's bundle)") from None
            contenders, libraries = model_contenders(
                inputs.posterior, inputs.pfp_model, bundle, inputs.tvm_folder, tune, config, made_from=inputs.made_from,
                variance_scale=inputs.variance_scale, seed=seed, prepared=inputs.images)
            figures = serve_model(ServingSetup(contenders, inputs.images,
                                               loads={"quiet": 0, "busy": config.serving_busy_processes}), config)
            entry: dict[str, Any] = {"contenders": libraries, **figures, "ratios": {
                c: {f"batch_{b}": {f"threads_{t}": ratios(figures[c][f"batch_{b}"], b, t) for t in config.serving_threads}
                    for b in config.serving_batch_sizes} for c in CONDITIONS}}
            head_images = inputs.images[:config.head_images]
            temperature = float(bundle.bundle.metadata["calibration"]["temperature"])
            entry["head_error"] = head_error(bundle.predict(head_images), temperature, draws=config.head_reference_draws,
                                             seed=seed)
            report["models"][model] = entry
        report["threads"] = choose_threads(report["models"], config.serving_threads,
                                           current_default=pfp_runtime.DEFAULT_THREADS, batches=config.serving_batch_sizes)
        report["summary"] = summary(report["models"], report["threads"]["chosen"])
    finally:
        torch.set_num_threads(saved_torch)
        runtime_tvm.configure_threads(int(saved_threads) if saved_threads else len(os.sched_getaffinity(0)))
        if saved_threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = saved_threads
    report["host"]["loadavg_end"] = list(os.getloadavg())
    return report


def summary(per_model: Mapping[str, Mapping], threads: int) -> dict[str, Any]:
    """The headline figures at the chosen thread count: per model, condition and batch size, the runtime's
    p50/p99 and images/s and its ratios to the other contenders (p50)."""
    out: dict[str, Any] = {"threads": threads}
    for model, entry in per_model.items():
        for condition in CONDITIONS:
            for batch, figures in entry[condition].items():
                if batch.startswith("batch_"):
                    stats = figures["pfp_runtime"][f"threads_{threads}"]
                    row = {f"pfp_runtime_{k}": stats[k] for k in ("p50_ms", "p99_ms", "images_per_s")}
                    row.update({f"{name}_p50": value["p50"] for name, value in
                                entry["ratios"][condition][batch][f"threads_{threads}"].items()})
                    out.setdefault(model, {}).setdefault(condition, {})[batch] = row
    return out


def serving_images(arrays: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    """Raw test images, a third each of MNIST, Ambiguous-MNIST and Fashion-MNIST, interleaved."""
    splits = [arrays[key] for key in ("mnist_test_x", "ambiguous_test_x", "ood_test_x")]
    per_split = max(1, -(-count // len(splits)))
    taken = [split[:per_split] for split in splits]
    rows = [part[i] for i in range(per_split) for part in taken if i < len(part)]
    return np.ascontiguousarray(np.stack(rows[:count]).astype(np.uint8))
