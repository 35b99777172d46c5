"""``python -m pfp.fidelity --model M --workspace DIR``: the fidelity table of a DVC workspace's trained model
(read only): PFP at variance scale 1 and at each calibration objective's scale against whole-weight Monte-Carlo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pfp.artifacts.trained import load_trained
from pfp.data.dirty_mnist import load_prepared, normalise
from pfp.fidelity import fidelity_report, format_table, pfp_options
from pfp.stage import PREPARED_DIR

SETS = (("mnist", "mnist_test"), ("ambiguous", "ambiguous_test"), ("fashion", "ood_test"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfp.fidelity", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workspace", type=Path, default=Path("."), help="DVC workspace (read only)")
    parser.add_argument("--samples", type=int, default=1000, help="whole-weight draws")
    parser.add_argument("--images", type=int, default=300, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-samples", type=int, default=100)
    parser.add_argument("--covariance-layers", type=int, default=None,
                        help="the covariance-aware option's last-k dense layers (default: the model's own; 0: none)")
    args = parser.parse_args(argv)
    trained = load_trained(args.model, args.workspace)
    arrays = load_prepared(args.workspace / PREPARED_DIR)
    inputs = {name: normalise(arrays[f"{key}_x"][: args.images])
              for name, key in SETS}
    fits = trained.calibration.fits or {trained.calibration.objective: {"variance_scale": trained.calibration.variance_scale}}
    options = pfp_options(trained.pfp_model, scales={name: fit["variance_scale"] for name, fit in fits.items()},
                          covariance_layers=args.covariance_layers)
    report = fidelity_report(trained.posterior, trained.pfp_model.spec, inputs, options, samples=args.samples,
                             seed=args.seed, logit_samples=args.logit_samples)
    scales = ", ".join(f"{name} {fit['variance_scale']:.4g}" for name, fit in fits.items())
    print(f"{args.model}: PFP vs {args.samples} whole-weight draws, {args.images} images per set; "
          f"calibrated scales: {scales} (chosen: {trained.calibration.objective})")
    print(format_table(report.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
