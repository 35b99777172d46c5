"""Stage convert: the posterior in a model's slot -> its PFP parameters, refusing another model's posterior."""

from __future__ import annotations

import pytest

from pfp.artifacts.pfp_params import load_pfp_params
from pfp.artifacts.posterior import save_posterior
from pfp.bnn import PosteriorError
from pfp.config import ConvertConfig
from pfp.convert import convert_posterior
from pfp.stages.convert import convert

from ..common import random_posterior


def test_convert_writes_the_pfp_params_with_their_parent(tmp_path):
    posterior = random_posterior("lenet")
    source = tmp_path / "models" / "lenet" / "posterior.npz"
    save_posterior(posterior, source)
    result = convert("lenet", ConvertConfig(), root=tmp_path)
    assert result.path == tmp_path / "models" / "lenet" / "pfp.npz"
    loaded = load_pfp_params(result.path, "lenet", parent=source)
    expected = convert_posterior(posterior, pool_first=True, pool_rule="argmax_mean", covariance_layers=2)  # the defaults
    assert loaded.spec == expected.spec == result.pfp_model.spec
    assert loaded.covariance_layers == result.pfp_model.covariance_layers == 2
    assert result.layer_order == " ".join(layer.kind for layer in expected.spec.layers)
    assert set(result.metrics()) == {f"{name}.weight_var_mean" for name in expected.params}
    # the trained order, when asked
    assert convert("lenet", ConvertConfig(pool_before_relu=False, pool_rule="clark"),
                   root=tmp_path).pfp_model.spec == posterior.spec
    # convert.pool_rule reaches every max-pool of the saved spec
    result = convert("lenet", ConvertConfig(pool_rule="clark_logistic"), root=tmp_path)
    saved = load_pfp_params(result.path, "lenet", parent=source).spec
    assert [layer.rule.value for layer in saved.layers if layer.kind == "maxpool2d"] == ["clark_logistic"] * 2


def test_lenet_posterior_copied_into_the_mlp_slot_is_refused(tmp_path):
    """Reported: LeNet's posterior copied into the MLP's slot was converted without a word."""
    source = tmp_path / "models" / "mlp" / "posterior.npz"
    save_posterior(random_posterior("lenet"), source)
    with pytest.raises(PosteriorError) as info:
        convert("mlp", ConvertConfig(), root=tmp_path)
    message = str(info.value)
    for fragment in (str(source), "of model 'lenet', expected 'mlp'", "belongs to another model"):
        assert fragment in message
    assert sorted(p.name for p in source.parent.iterdir()) == ["posterior.npz"]  # nothing written
