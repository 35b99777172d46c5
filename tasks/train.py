"""DVC stage `train@MODEL`: Pyro SVI on Dirty-MNIST -> constrained posterior."""

import json

import torch

from pfp import plots, tracking
from pfp.bnn import train_svi
from pfp.data.dirty_mnist import load_prepared, training_set
from pfp.io import atomic_write_json
from pfp.spec import build_spec
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, model_argument, posterior_path, run_stage


def main(params, argv):
    model = model_argument(params, argv)
    config = params.train[model]
    torch.manual_seed(params.seed)
    manifest = json.loads((PREPARED_DIR / "manifest.json").read_text())
    with tracking.stage_run(f"train@{model}", params={"model": model, "seed": params.seed, **config.model_dump()},
                            tags={"data_hash": manifest["data_hash"]}) as run:
        x, y = training_set(load_prepared(PREPARED_DIR))
        posterior, losses = train_svi(build_spec(model), config, x, y, seed=params.seed)
        posterior.save(posterior_path(model))
        summary = {"final_elbo_loss": losses[-1] if losses else None, "epochs": len(losses), "train_pairs": int(x.shape[0]),
                   "mean_weight_scale": {site: float(scale.mean()) for site, scale in posterior.scale.items()}}
        atomic_write_json(METRICS_DIR / f"train_{model}.json", {"elbo_loss": losses, **summary})
        run.log_metric_series("elbo_loss", losses)
        run.log_metrics(summary)
        if losses:
            run.log_artifact(plots.loss_curve(losses, PLOTS_DIR / model / "train" / "loss.png", title=f"{model}: ELBO loss per example"))
        run.log_artifact(posterior_path(model))


if __name__ == "__main__":
    run_stage(main)
