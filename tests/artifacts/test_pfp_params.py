"""The PFP parameter artifact: its parent posterior recorded and checked; another model's refused."""

from __future__ import annotations

from pfp.artifacts.header import sha256_of
from pfp.artifacts.pfp_params import load_pfp_params, save_pfp_params
from pfp.artifacts.posterior import save_posterior
from pfp.bnn import PosteriorError
from pfp.convert import convert_posterior

from ..common import npz_header, random_posterior, refusal


def test_pfp_params_record_the_posterior_they_came_from(tmp_path):
    source = tmp_path / "posterior.npz"
    posterior = random_posterior("mlp")
    save_posterior(posterior, source)
    path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(posterior), path, parent=source)
    assert npz_header(path) == {"kind": "pfp_params", "model": "mlp", "format": 1, "parent_sha256": sha256_of(source)}
    assert load_pfp_params(path, "mlp", parent=source).spec == convert_posterior(posterior).spec


def test_lenet_pfp_params_are_refused_for_the_mlp(tmp_path):
    path = tmp_path / "models" / "mlp" / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("lenet")), path, parent=None)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp"),
            str(path), "PFP parameter file of model 'lenet', expected 'mlp'", "belongs to another model")


def test_pfp_params_from_another_posterior_are_stale(tmp_path):
    old, new = tmp_path / "old.npz", tmp_path / "posterior.npz"
    save_posterior(random_posterior("mlp", seed=1), old)
    save_posterior(random_posterior("mlp", seed=2), new)
    path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=1)), path, parent=old)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp", parent=new),
            str(path), "stale", "made from another posterior.npz", "re-run the convert@mlp stage")
    # no parent recorded: cannot be checked, so refused when a check is asked for
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=2)), path, parent=None)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp", parent=new), "records no parent")
