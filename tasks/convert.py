"""DVC stage `convert@MODEL`: posterior -> PFP parameters."""

from pfp import tracking
from pfp.bnn import Posterior
from pfp.convert import convert_posterior
from pfp.stage import model_argument, pfp_params_path, posterior_path, run_stage


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"convert@{model}", params={"model": model}) as run:
        pfp_model = convert_posterior(Posterior.load(posterior_path(model)))
        pfp_model.save(pfp_params_path(model))
        run.log_metrics({f"{name}.weight_var_mean": float(p.weight_var.mean()) for name, p in pfp_model.params.items()})
        run.log_artifact(pfp_params_path(model))


if __name__ == "__main__":
    run_stage(main)
