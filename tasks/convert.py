"""DVC stage `convert@MODEL`: posterior -> PFP parameters."""

from pfp import tracking
from pfp.bnn import Posterior
from pfp.convert import convert_posterior
from pfp.stage import model_argument, pfp_params_path, posterior_path, run_stage


def main(params, argv):
    model = model_argument(params, argv)
    pool_first = params.convert.pool_before_relu
    with tracking.stage_run(f"convert@{model}", params={"model": model, "pool_before_relu": pool_first}) as run:
        pfp_model = convert_posterior(Posterior.load(posterior_path(model)), pool_first=pool_first)
        pfp_model.save(pfp_params_path(model))
        run.set_tags({"layer_order": " ".join(layer.kind for layer in pfp_model.spec.layers)})
        run.log_metrics({f"{name}.weight_var_mean": float(p.weight_var.mean()) for name, p in pfp_model.params.items()})
        run.log_artifact(pfp_params_path(model))


if __name__ == "__main__":
    run_stage(main)
