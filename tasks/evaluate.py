"""DVC stage `evaluate@MODEL`: svi / pfp / det metrics -> metrics/evaluate/MODEL.json + plots."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages import evaluate


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"evaluate@{model}", params={"model": model, **params.evaluate.model_dump(mode="json")},
                            datasets=["test", "ood"]) as run:
        outcome = evaluate.run(model, params.evaluate, params.tune, seed=params.seed)
        run.log_metrics(outcome.results)
        run.set_tags(outcome.tags)
        run.log_artifact(outcome.plot_dir, artifact_path="plots")


if __name__ == "__main__":
    run_stage(main)
