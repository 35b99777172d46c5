"""DVC stage `convert@MODEL`: posterior -> PFP parameters (logic: pfp.stages.convert)."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages.convert import convert


def main(params, argv):
    model = model_argument(params, argv)
    config = params.convert
    with tracking.stage_run(f"convert@{model}", params={"model": model, "pool_before_relu": config.pool_before_relu,
                                                                "pool_rule": config.pool_rule.value}) as run:
        result = convert(model, config)
        run.set_tags({"layer_order": result.layer_order})
        run.log_metrics(result.metrics())
        run.log_artifact(result.path)


if __name__ == "__main__":
    run_stage(main)
