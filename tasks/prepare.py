"""DVC stage `prepare`: IDX files -> Dirty-MNIST splits + manifest (logic: pfp.stages.prepare)."""

from pfp import tracking
from pfp.stage import run_stage
from pfp.stages.prepare import prepare


def main(params, argv):
    with tracking.stage_run("prepare", params={"seed": params.seed, "data": params.data.model_dump(),
                                               "ambiguous": params.ambiguous.model_dump()}) as run:
        result = prepare(params)
        run.set_tags({"data_hash": result.data_hash})
        run.log_metrics(result.metrics())
        run.log_artifact(result.manifest_path)


if __name__ == "__main__":
    run_stage(main)
