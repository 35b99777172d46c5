"""Stage ``train@MODEL``: Pyro SVI on Dirty-MNIST -> the constrained posterior, loss curve and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pfp import plots
from pfp.artifacts.posterior import save_posterior
from pfp.bnn import Posterior, train_svi
from pfp.config import TrainConfig
from pfp.data.dirty_mnist import load_prepared, training_set
from pfp.data.idx import DataError
from pfp.io import atomic_write_json
from pfp.spec import build_spec
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, posterior_path


@dataclass(frozen=True)
class TrainResult:
    """What the stage wrote: the posterior, the per-epoch loss, the metrics file and the loss plot."""

    posterior: Posterior
    losses: list[float]
    summary: dict[str, Any]  # metrics/train_MODEL.json without the loss series
    posterior_path: Path
    metrics_path: Path
    loss_plot: Optional[Path]  # None when no epoch ran


def data_hash(root: Path = Path(".")) -> str:
    """The prepared data's hash (from its manifest); refuses when the prepare stage has not run."""
    manifest = Path(root) / PREPARED_DIR / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"{manifest}: not found; run the prepare stage first")
    try:
        return json.loads(manifest.read_text())["data_hash"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{manifest}: not a readable manifest ({error}); re-run the prepare stage") from None


def train(model: str, config: TrainConfig, *, seed: int, root: Path = Path("."), progress: bool = True) -> TrainResult:
    """Fit the mean-field posterior of ``model`` by SVI on the prepared training pairs.

    Writes ``models/MODEL/posterior.npz`` (its parent: the prepared data's manifest),
    ``metrics/train_MODEL.json`` and ``plots/MODEL/train/loss.png`` under ``root``.

    Parameters
    ----------
    model
        The architecture (``mlp``, ``lenet``).
    config
        Its ``train.MODEL`` section.
    seed
        Seeds torch, Pyro and the minibatch order.
    root
        The workspace folder.
    progress
        Show a progress bar.
    """
    root = Path(root)
    manifest = root / PREPARED_DIR / "manifest.json"
    data_hash(root)  # the prepared data is there
    torch.manual_seed(seed)
    x, y = training_set(load_prepared(root / PREPARED_DIR))
    posterior, losses = train_svi(build_spec(model), config, x, y, seed=seed, progress=progress)
    path = root / posterior_path(model)
    save_posterior(posterior, path, parent=manifest)
    summary = {"final_elbo_loss": losses[-1] if losses else None, "epochs": len(losses), "train_pairs": int(x.shape[0]),
               "mean_weight_scale": {site: float(scale.mean()) for site, scale in posterior.scale.items()}}
    metrics_path = root / METRICS_DIR / f"train_{model}.json"
    atomic_write_json(metrics_path, {"elbo_loss": losses, **summary})
    loss_plot = None
    if losses:
        loss_plot = plots.loss_curve(losses, root / PLOTS_DIR / model / "train" / "loss.png",
                                     title=f"{model}: ELBO loss per example")
    return TrainResult(posterior=posterior, losses=losses, summary=summary, posterior_path=path,
                       metrics_path=metrics_path, loss_plot=loss_plot)
