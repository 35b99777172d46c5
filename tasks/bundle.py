"""DVC stage `bundle@MODEL`: deployable bundles -> models/MODEL/bundle/TARGET, metrics/bundle_MODEL.json."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages import bundle


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"bundle@{model}", params={"model": model, **params.bundle.model_dump(mode="json")}) as run:
        outcome = bundle.run(model, params.bundle, params.tune, seed=params.seed)
        run.log_metrics({"ood_threshold": outcome.summary["ood"]["threshold"],
                         "ood_validation_tpr": outcome.summary["ood"]["validation_tpr"]})
        run.log_artifact(outcome.summary_path)
        for target, built in outcome.bundles.items():
            run.log_artifact(built.folder, artifact_path=f"bundle/{target}")


if __name__ == "__main__":
    run_stage(main)
