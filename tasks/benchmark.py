"""DVC stage `benchmark`: latency of every predictor -> metrics/latency.json, profile and memory -> metrics/profile.json,
serving from raw images (quiet and loaded, thread choice, head error) -> metrics/serving.json."""

from pfp import tracking
from pfp.stage import run_stage
from pfp.stages import benchmark


def main(params, argv):
    with tracking.stage_run("benchmark", params=params.benchmark.model_dump(mode="json"), system_metrics=True) as run:
        outcome = benchmark.run([m.value for m in params.models], params.benchmark, params.tune, seed=params.seed)
        for plot in outcome.plots:
            run.log_artifact(plot)
        run.log_metrics(outcome.latency)
        run.log_metrics(benchmark.memory_metrics(outcome.profile))
        run.log_metrics({"serving": outcome.serving})
        run.set_tags({"serving.threads.chosen": outcome.serving["threads"]["chosen"]})
        run.log_artifact(outcome.latency_path)
        run.log_artifact(outcome.profile_path)
        run.log_artifact(outcome.serving_path)


if __name__ == "__main__":
    run_stage(main)
