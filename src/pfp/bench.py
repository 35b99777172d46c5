"""Latency of every way to get a BNN prediction, measured side by side in one process.

Figures are milliseconds per batch; ratios between them are the point (the machine is shared
and noisy, so no absolute number is asserted anywhere). Predictors are made and timed through
the backend interface (:mod:`pfp.backends.base`): compiled code with its own timer
(``Predictor.time``), all compiled variants in interleaved rounds (:func:`time_side_by_side`);
Python-level baselines with a warm-up and the median of repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import pyro
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

from pfp.backends import base
from pfp.backends.base import Backend, Predictor, Schedule
from pfp.backends.torch_ref import ensemble_forward
from pfp.backends.weights import sample_stacked_weights
from pfp.bnn import Posterior, make_model
from pfp.config import Peer, Variant
from pfp.convert import PFPModel


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 10) -> float:
    """Median wall-clock milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_side_by_side(models: Mapping[str, Predictor], x, *, number: int, rounds: int) -> dict[str, float]:
    """Median latency (ms per batch) of each predictor, measured in interleaved rounds.

    Each round times every model once (``number`` calls each), so a burst of load on a shared
    machine slows all of them alike instead of one variant: ratios between them stay meaningful.
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(model.time(number=number, repeat=1, x=x)["median_ms"])
    return {name: statistics.median(values) for name, values in samples.items()}


def guide_from_posterior(posterior: Posterior, model: Callable, x: torch.Tensor) -> AutoNormal:
    """An AutoNormal guide holding the trained posterior, as a user would have after training."""
    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(x, torch.zeros(x.shape[0], dtype=torch.long))  # create the parameters (labels only fix the obs site), then load the trained values
    for site in posterior.loc:
        # assigning a tensor to a PyroParam sets its constrained value: PyroModule stores
        # transform_to(guide.scale_constraint).inv(scale) (the inverse softplus) as the raw parameter
        setattr(guide.locs, site, posterior.loc[site])
        setattr(guide.scales, site, posterior.scale[site])
    return guide


#: latency.json keys of the compiled predictors, per variant
TUNED_KEYS = {Variant.PFP: "pfp_tvm_ms", Variant.PFP_SEPARATE: "pfp_tvm_separate_ms", Variant.DET: "det_tvm_ms",
              Variant.SVI: "svi_tvm_ms", Variant.PFP_COV: "pfp_cov_tvm_ms"}


def benchmark_model(posterior: Posterior, pfp_model: PFPModel, batch_size: int, *, svi_samples: int = 30,
                    repeat: int = 10, warmup: int = 2, tvm_number: int = 20, tvm_repeat: int = 5,
                    libraries: Mapping[Variant, Predictor] | None = None, variance_scale: float = 1.0,
                    seed: int = 0, peers: Sequence[Peer] = ()) -> dict:
    """Latency (ms per batch) of each predictor of this model at ``batch_size``, side by side.

    ``libraries`` maps a :class:`~pfp.config.Variant` to its tuned compiled predictor (the tune
    stage's libraries); a variant without one is compiled here with the hand schedules, and
    ``schedules`` in the result says which. ``*_untuned_ms`` is TVM's default lowering.
    ``warmup`` untimed calls precede the ``repeat`` timed ones of each Python-level baseline.
    ``peers`` (:mod:`pfp.peers`, each built and checked against the eager reference first) are
    timed in the same interleaved rounds as the compiled predictors (``PEER_ms``); ``peers`` in the
    result says what each ran with.
    """
    spec = posterior.spec
    libraries = dict(libraries or {})
    x = torch.randn(batch_size, *spec.input_shape)
    results: dict = {}
    torch_model = make_model(spec, prior_scale=1.0)
    guide = guide_from_posterior(posterior, torch_model, x)
    predictive = Predictive(torch_model, guide=guide, num_samples=svi_samples, return_sites=("_RETURN",))
    options = {"batch_size": batch_size, "variance_scale": variance_scale, "svi_samples": svi_samples, "seed": seed}
    # the PyTorch baselines run the converted layer order too (as the compiled ones do)
    pfp_torch = base.create(Backend.TORCH, Variant.PFP, pfp_model, posterior, **options)
    with torch.no_grad():
        results["svi_pyro_ms"] = time_call(lambda: predictive(x), warmup=warmup, repeat=repeat)
        results["svi_torch_ms"] = time_call(
            lambda: torch.softmax(ensemble_forward(pfp_model.spec, sample_stacked_weights(posterior, svi_samples), x), -1).mean(0),
            warmup=warmup, repeat=repeat)
    for _ in range(warmup):
        pfp_torch.predict(x.numpy())
    results["pfp_torch_ms"] = pfp_torch.time(number=1, repeat=repeat, x=x.numpy())["median_ms"]

    def compiled(variant: Variant, schedule: Schedule) -> Predictor:
        return base.create(Backend.TVM, variant, pfp_model, posterior, **options, schedule=schedule)

    models = {name: compiled(variant, Schedule.DEFAULT)
              for variant, name in ((Variant.PFP, "pfp_tvm_untuned_ms"), (Variant.PFP_SEPARATE, "pfp_tvm_separate_untuned_ms"),
                                    (Variant.DET, "det_tvm_untuned_ms"))}
    models["pfp_tvm_hand_ms"] = compiled(Variant.PFP, Schedule.HAND)
    schedules = {}
    for variant, name in TUNED_KEYS.items():
        if variant is Variant.PFP_COV and pfp_model.covariance_layers < 2:
            continue  # a plain model has no covariance-aware variant
        library = libraries.get(variant)
        schedules[variant.value] = "tuned" if library is not None else "hand"
        models[name] = library if library is not None else compiled(variant, Schedule.HAND)
    tvm_threads = models["pfp_tvm_ms"].describe()["threads"]
    if peers:
        from pfp.peers import make_peers

        peer_models = make_peers(list(peers), pfp_model, posterior, x.numpy(), variance_scale=variance_scale, threads=tvm_threads)
        models.update(peer_models)
        results["peers"] = {name.removesuffix("_ms"): peer.describe() for name, peer in peer_models.items()}
    results.update(time_side_by_side(models, x.numpy(), number=tvm_number, rounds=tvm_repeat))
    results["svi_pyro_over_pfp_tvm"] = results["svi_pyro_ms"] / results["pfp_tvm_ms"]
    results["svi_tvm_over_pfp_tvm"] = results["svi_tvm_ms"] / results["pfp_tvm_ms"]
    results["pfp_over_det_tvm"] = results["pfp_tvm_ms"] / results["det_tvm_ms"]
    results["separate_over_joint_tvm"] = results["pfp_tvm_separate_ms"] / results["pfp_tvm_ms"]
    results["untuned_over_tuned_pfp_tvm"] = results["pfp_tvm_untuned_ms"] / results["pfp_tvm_ms"]
    if "pfp_cov_tvm_ms" in results:
        results["pfp_cov_over_pfp_tvm"] = results["pfp_cov_tvm_ms"] / results["pfp_tvm_ms"]
        results["svi_tvm_over_pfp_cov_tvm"] = results["svi_tvm_ms"] / results["pfp_cov_tvm_ms"]
    # PFP-TVM against the fastest way to the same answer without it (eager PyTorch counts too)
    peer_pfp = [results["pfp_torch_ms"]] + [results[f"{p.value}_ms"] for p in map(Peer, peers) if p.variant is Variant.PFP]
    results["pfp_tvm_over_best_peer_pfp"] = results["pfp_tvm_ms"] / min(peer_pfp)
    peer_det = [results[f"{p.value}_ms"] for p in map(Peer, peers) if p.variant is Variant.DET]
    if peer_det:
        results["det_tvm_over_best_peer_det"] = results["det_tvm_ms"] / min(peer_det)
    results["schedules"] = schedules
    # what the figures ran on: TVM's pool is sized by pfp.backends.tvm (physical cores), torch's by torch
    results["threads"] = {"tvm": tvm_threads, "torch": pfp_torch.describe()["threads"]}
    return results
