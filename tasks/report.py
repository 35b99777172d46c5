"""DVC stage `report`: merge the per-model evaluations into metrics/evaluate.json (logic: pfp.stages.report)."""

from pfp import tracking
from pfp.stage import run_stage
from pfp.stages.report import report


def main(params, argv):
    result = report(params.models)
    with tracking.stage_run("report") as run:
        run.log_metrics(result.headline())
        run.log_artifact(result.path)


if __name__ == "__main__":
    run_stage(main)
