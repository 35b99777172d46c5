"""DVC stage `prepare`: IDX files -> Dirty-MNIST splits + manifest."""

from pfp import tracking
from pfp.data.dirty_mnist import prepare_dirty_mnist, save_prepared
from pfp.stage import PREPARED_DIR, run_stage


def main(params, argv):
    with tracking.stage_run("prepare", params={"seed": params.seed, "data": params.data.model_dump(),
                                               "ambiguous": params.ambiguous.model_dump()}) as run:
        arrays, manifest = prepare_dirty_mnist(params)
        save_prepared(PREPARED_DIR, arrays, manifest)
        run.set_tags({"data_hash": manifest["data_hash"]})
        run.log_metrics({"count": manifest["counts"], "ambiguous_acceptance_rate": manifest["ambiguous"].get("acceptance_rate", 1.0)})
        run.log_artifact(PREPARED_DIR / "manifest.json")


if __name__ == "__main__":
    run_stage(main)
