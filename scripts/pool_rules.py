#!/usr/bin/env python
"""Measure PFP's 2x2 max-pool rules (pfp.spec.PoolRule): compiled latency and fidelity to Monte-Carlo.

``latency``: LeNet PFP (TVM, hand schedules, host) with each rule side by side with the
deterministic twin, interleaved rounds (pfp.bench.time_side_by_side), per batch size; prints
pfp_ms, det_ms and pfp/det per rule.

``profile``: TVM's per-kernel profile of the same modules (ms per call).

``fidelity``: on a trained posterior, PFP (PyTorch reference) with each rule against whole-weight
Monte-Carlo of the same posterior (``--samples`` weight draws, pfp.backends.torch_ref.ensemble_forward)
on ``--images`` MNIST test and Fashion-MNIST images: median and 90th percentile of the logit
variance ratio PFP / MC, and the mean |PFP mean - MC mean| in MC standard deviations (its floor
from the MC mean's own error is about 0.8 / sqrt(samples)).

Usage::

    PYTHONPATH=src python scripts/pool_rules.py latency --posterior /work/full/models/lenet/posterior.npz
    PYTHONPATH=src python scripts/pool_rules.py profile --posterior /work/full/models/lenet/posterior.npz
    PYTHONPATH=src python scripts/pool_rules.py fidelity --posterior /work/full/models/lenet/posterior.npz \\
        --data /work/full/data/prepared --samples 1000 --images 100

Each prints a JSON document (also written to ``--out`` if given). Latency needs a quiet host: the
1-minute load average before and after each batch size is recorded beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pfp.artifacts.posterior import load_posterior  # noqa: E402
from pfp.convert import convert_posterior  # noqa: E402
from pfp.spec import PoolRule  # noqa: E402


def latency(args) -> dict:
    from pfp.backends.base import Backend, create
    from pfp.bench import time_side_by_side
    from pfp.config import Variant

    posterior = load_posterior(args.posterior, None)
    models = {rule: convert_posterior(posterior, pool_rule=rule) for rule in PoolRule}
    result = {}
    for batch in args.batch_sizes:
        predictors = {"det": create(Backend.TVM, Variant.DET, models[PoolRule.CLARK], posterior, batch_size=batch)}
        for rule, model in models.items():
            predictors[rule.value] = create(Backend.TVM, Variant.PFP, model, batch_size=batch)
        x = torch.rand(batch, *posterior.spec.input_shape, generator=torch.Generator().manual_seed(0)).numpy()
        # about 20 ms of work per timed call of the slowest predictor, whatever the batch
        number = max(1, int(20 / (0.05 * batch + 0.1)))
        load_before = os.getloadavg()[0]
        ms = time_side_by_side(predictors, x, number=number, rounds=args.rounds)
        result[batch] = {rule.value: {"pfp_ms": ms[rule.value], "det_ms": ms["det"], "ratio": ms[rule.value] / ms["det"]}
                         for rule in PoolRule}
        # a busy host inflates the parallel kernels' times unevenly: say how busy it was
        result[batch]["load_average_1min"] = [load_before, os.getloadavg()[0]]
        print(json.dumps({batch: result[batch]}), file=sys.stderr, flush=True)
    return result


def profile(args) -> dict:
    """TVM's per-kernel profile (ms per call) of LeNet PFP with each rule and of the twin, per batch size."""
    from pfp.backends.base import Backend, create
    from pfp.config import Variant

    posterior = load_posterior(args.posterior, None)
    result = {}
    for batch in args.batch_sizes:
        x = torch.rand(batch, *posterior.spec.input_shape, generator=torch.Generator().manual_seed(0)).numpy()
        models = {rule.value: create(Backend.TVM, Variant.PFP, convert_posterior(posterior, pool_rule=rule), batch_size=batch)
                  for rule in PoolRule}
        models["det"] = create(Backend.TVM, Variant.DET, convert_posterior(posterior), posterior, batch_size=batch)
        result[batch] = {name: {row["operator"]: row["ms"] for row in model.profile(number=args.number, x=x)}
                         for name, model in models.items()}
    return result


def _images(data: Path, count: int) -> dict[str, torch.Tensor]:
    from pfp.data.dirty_mnist import load_prepared, normalise

    arrays = load_prepared(data)
    return {"mnist_test": normalise(arrays["mnist_test_x"][:count]), "fashion": normalise(arrays["ood_test_x"][:count])}


def _mc_moments(posterior, x: torch.Tensor, samples: int, chunk: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pfp.backends.torch_ref import ensemble_forward
    from pfp.backends.weights import sample_stacked_weights

    generator = torch.Generator().manual_seed(seed)
    total = total_sq = None
    done = 0
    with torch.no_grad():
        while done < samples:
            size = min(chunk, samples - done)
            logits = ensemble_forward(posterior.spec, sample_stacked_weights(posterior, size, generator), x).double()
            total = logits.sum(0) if total is None else total + logits.sum(0)
            total_sq = (logits**2).sum(0) if total_sq is None else total_sq + (logits**2).sum(0)
            done += size
    mean = total / samples
    var = (total_sq - samples * mean**2) / (samples - 1)
    return mean.numpy(), var.numpy()


def fidelity(args) -> dict:
    from pfp.convert import predict_pfp

    torch.set_num_threads(args.threads)
    posterior = load_posterior(args.posterior, None)
    result = {}
    for name, x in _images(Path(args.data), args.images).items():
        mc_mean, mc_var = _mc_moments(posterior, x, args.samples, args.chunk, args.seed)
        result[name] = {}
        for rule in PoolRule:
            mean, var = (t.double().numpy() for t in predict_pfp(convert_posterior(posterior, pool_rule=rule), x))
            ratio = var / mc_var
            result[name][rule.value] = {
                "var_ratio_median": float(np.median(ratio)), "var_ratio_p10": float(np.percentile(ratio, 10)),
                "var_ratio_p90": float(np.percentile(ratio, 90)),
                "mean_error_sd": float(np.mean(np.abs(mean - mc_mean) / np.sqrt(mc_var)))}
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    return {"samples": args.samples, "images": args.images, "sets": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100])
    lat.add_argument("--rounds", type=int, default=15)
    prof = sub.add_parser("profile")
    prof.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100])
    prof.add_argument("--number", type=int, default=50)
    fid = sub.add_parser("fidelity")
    fid.add_argument("--data", default="data/prepared")
    fid.add_argument("--samples", type=int, default=1000)
    fid.add_argument("--images", type=int, default=100)
    fid.add_argument("--chunk", type=int, default=50)
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--threads", type=int, default=2)
    for command in (lat, prof, fid):
        command.add_argument("--posterior", default="models/lenet/posterior.npz")
        command.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = {"latency": latency, "profile": profile, "fidelity": fidelity}[args.command](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
