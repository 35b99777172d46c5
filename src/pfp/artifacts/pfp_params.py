"""The PFP parameter artifact, ``models/M/pfp.npz``: the converted model description and five
float32 arrays per layer (weight mean, variance, E[w^2]; bias mean, variance), its parent the
posterior it was converted from."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pfp.artifacts.header import HEADER_KEY, ArtifactHeader, ArtifactKind, PathLike, header_entry, model_name
from pfp.artifacts.posterior import SPEC_KEY, ParameterFileError, checked_array, read_parameter_archive
from pfp.backends.covariance import covariance_block
from pfp.backends.torch_ref import GaussianLayerParams
from pfp.convert import PFPModel
from pfp.io import atomic_savez
from pfp.spec import SpecError

#: the model's PFP option (pfp.convert.PFPModel.covariance_layers); files written before it have none: plain PFP
COVARIANCE_KEY = "covariance_layers"
FIELDS = ("weight_mean", "weight_var", "weight_m2", "bias_mean", "bias_var")
_NON_NEGATIVE = ("weight_var", "weight_m2", "bias_var")


def save_pfp_params(pfp_model: PFPModel, path: PathLike, *, parent: Optional[PathLike]) -> ArtifactHeader:
    """Write the PFP parameters atomically.

    Parameters
    ----------
    pfp_model
        The converted model; its spec name is the model the file belongs to.
    path
        Where to write.
    parent
        The posterior file it was converted from (None only for a model made in memory).

    Returns
    -------
    ArtifactHeader
        The header written.
    """
    header = ArtifactHeader.for_kind(ArtifactKind.PFP_PARAMS, pfp_model.spec.name, parent)
    arrays = {HEADER_KEY: header_entry(header), SPEC_KEY: np.array(pfp_model.spec.to_json()),
              COVARIANCE_KEY: np.array(pfp_model.covariance_layers, dtype=np.int64)}
    for name, layer in pfp_model.params.items():
        for field in FIELDS:
            arrays[f"{name}.{field}"] = getattr(layer, field).numpy().astype(np.float32)
    atomic_savez(path, arrays)
    return header


def load_pfp_params(path: PathLike, model: Optional[str], *, parent: Optional[PathLike] = None) -> PFPModel:
    """Read and validate the PFP parameters of ``model`` (None: whichever model).

    Refuses (``PosteriorError``) what :func:`~pfp.artifacts.posterior.load_posterior` refuses,
    with negative variances or E[w^2] in place of non-positive scales; with ``parent`` (the
    posterior file), parameters converted from another posterior.
    """
    _, spec, arrays, where = read_parameter_archive(ArtifactKind.PFP_PARAMS, path,
                                                    None if model is None else model_name(model), parent)
    params = {}
    for layer in spec.parametric_layers():
        values = {}
        for field in FIELDS:
            key = f"{layer.name}.{field}"
            value = checked_array(arrays, key, layer.bias_shape if field.startswith("bias") else layer.weight_shape, where)
            if field in _NON_NEGATIVE and np.any(value < 0):
                raise ParameterFileError(f"{where}: {key} has negative values; variances must be >= 0")
            values[field] = torch.from_numpy(value)
        mean, var, m2 = (values[field].numpy() for field in ("weight_mean", "weight_var", "weight_m2"))
        if not np.allclose(m2, var + np.square(mean), rtol=1e-4, atol=1e-30):  # float32 rounding of the converter's sum
            raise ParameterFileError(f"{where}: {layer.name}.weight_m2 is not weight_var + weight_mean^2 (E[w^2]); "
                                     "the file is inconsistent, re-run the convert stage")
        params[layer.name] = GaussianLayerParams(**values)
    layers = arrays.pop(COVARIANCE_KEY, np.array(0))
    try:
        covariance_block(spec, int(layers))
    except (SpecError, TypeError, ValueError) as error:
        raise ParameterFileError(f"{where}: {COVARIANCE_KEY}: {error}") from None
    return PFPModel(spec=spec, params=params, covariance_layers=int(layers))
