"""A DVC workspace shared by the stage tests: the upstream stages' outputs for a random MLP, and
the tune stage run once in it (hand schedules measured, no search), then the bundle stage (host)."""

from __future__ import annotations

import pytest

from pfp.config import BundleConfig, TuneParams, Variant

from ..common import write_model_artifacts, write_prepared

#: the calibrated variance scale the workspace's libraries are compiled with
SCALE = 0.5


@pytest.fixture(scope="session")
def tune_params() -> TuneParams:
    return TuneParams(batch_sizes=[2], variants=[Variant.PFP, Variant.DET], trials_per_task=0, svi_samples=3, number=1,
                      min_repeat_ms=1)


@pytest.fixture(scope="session")
def bundle_config() -> BundleConfig:
    """Batch 2 is tuned (its database is used), batch 1 is not (hand schedules)."""
    return BundleConfig(batch_sizes=[1, 2], head_draws=16)


@pytest.fixture(scope="session")
def tuned_workspace(tmp_path_factory, tune_params, bundle_config):
    """(workspace folder, the tune stage's outcome); the bundle stage has run too."""
    from pfp.stages import bundle, tune

    workspace = tmp_path_factory.mktemp("workspace")
    write_model_artifacts(workspace, "mlp", variance_scale=SCALE)
    write_prepared(workspace)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        outcome = tune.run("mlp", tune_params, seed=1)
        bundle.run("mlp", bundle_config, tune_params, seed=1)
    return workspace, outcome
