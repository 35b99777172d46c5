"""DVC stage `tune@MODEL`: Meta Scheduler tuning + compiled libraries -> models/MODEL/tvm, metrics/tune_MODEL.json."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages import tune


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"tune@{model}", params={"model": model, **params.tune.model_dump(mode="json")},
                            tags=tune.tags(params.tune), system_metrics=True) as run:
        outcome = tune.run(model, params.tune, seed=params.seed)
        run.log_metrics(outcome.metrics)
        run.log_artifact(outcome.summary_path)
        run.log_artifact(outcome.library_dir, artifact_path="tvm")


if __name__ == "__main__":
    run_stage(main)
