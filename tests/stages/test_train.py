"""Stage train: a posterior of the model on the prepared pairs, with its metrics and loss plot."""

from __future__ import annotations

import json

import pytest

from pfp.artifacts.posterior import load_posterior
from pfp.config import TrainConfig
from pfp.data.idx import DataError
from pfp.spec import build_spec
from pfp.stages.train import data_hash, train

from ..common import write_prepared


def test_train_writes_posterior_metrics_and_plot(tmp_path):
    write_prepared(tmp_path, per_split=16)
    result = train("mlp", TrainConfig(epochs=2, batch_size=16), seed=0, root=tmp_path, progress=False)
    manifest = tmp_path / "data" / "prepared" / "manifest.json"
    posterior = load_posterior(tmp_path / "models" / "mlp" / "posterior.npz", "mlp", parent=manifest)
    assert posterior.spec == build_spec("mlp") and result.posterior_path.name == "posterior.npz"
    assert len(result.losses) == 2
    assert result.summary["train_pairs"] == 16 + 16 * 2  # MNIST train + every (ambiguous image, label) pair
    assert json.loads(result.metrics_path.read_text()) == {"elbo_loss": result.losses, **result.summary}
    assert result.loss_plot == tmp_path / "plots" / "mlp" / "train" / "loss.png" and result.loss_plot.is_file()
    assert data_hash(tmp_path) == "0" * 64


def test_train_needs_the_prepared_data(tmp_path):
    with pytest.raises(DataError, match="manifest.json: not found; run the prepare stage first"):
        train("mlp", TrainConfig(epochs=1), seed=0, root=tmp_path, progress=False)
    assert not (tmp_path / "models").exists()
