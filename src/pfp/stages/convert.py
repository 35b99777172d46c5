"""Stage ``convert@MODEL``: posterior -> PFP parameters (``models/MODEL/pfp.npz``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfp.artifacts.pfp_params import save_pfp_params
from pfp.artifacts.posterior import load_posterior
from pfp.config import ConvertConfig
from pfp.convert import PFPModel, convert_posterior
from pfp.stage import pfp_params_path, posterior_path


@dataclass(frozen=True)
class ConvertResult:
    """The converted model and where it was written."""

    pfp_model: PFPModel
    path: Path

    @property
    def layer_order(self) -> str:
        """The layer kinds in the order inference runs them (``flatten dense relu ...``)."""
        return " ".join(layer.kind for layer in self.pfp_model.spec.layers)

    def metrics(self) -> dict[str, float]:
        return {f"{name}.weight_var_mean": float(p.weight_var.mean()) for name, p in self.pfp_model.params.items()}


def convert(model: str, config: ConvertConfig, *, root: Path = Path(".")) -> ConvertResult:
    """Read ``models/MODEL/posterior.npz`` (refused if it belongs to another model or is invalid),
    convert it and write ``models/MODEL/pfp.npz`` with the posterior's hash as its parent.

    Parameters
    ----------
    model
        The architecture whose slot is converted.
    config
        The ``convert`` section (``pool_before_relu``, ``pool_rule``, ``covariance_layers``).
    root
        The workspace folder.
    """
    root = Path(root)
    source = root / posterior_path(model)
    pfp_model = convert_posterior(load_posterior(source, model), pool_first=config.pool_before_relu,
                                  pool_rule=config.pool_rule, covariance_layers=config.covariance_layers)
    path = root / pfp_params_path(model)
    save_pfp_params(pfp_model, path, parent=source)
    return ConvertResult(pfp_model=pfp_model, path=path)
