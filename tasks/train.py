"""DVC stage `train@MODEL`: Pyro SVI on Dirty-MNIST -> constrained posterior (logic: pfp.stages.train)."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages.train import data_hash, train


def main(params, argv):
    model = model_argument(params, argv)
    config = params.train[model]
    with tracking.stage_run(f"train@{model}", params={"model": model, "seed": params.seed, **config.model_dump()},
                            tags={"data_hash": data_hash()}, datasets=["training"]) as run:
        result = train(model, config, seed=params.seed)
        run.log_metric_series("elbo_loss", result.losses)
        run.log_metrics(result.summary)
        if result.loss_plot is not None:
            run.log_artifact(result.loss_plot)
        run.log_artifact(result.posterior_path)


if __name__ == "__main__":
    run_stage(main)
