"""The posterior artifact, ``models/M/posterior.npz``: float32 loc and scale per sample site,
the model description (``spec``) and the header (``artifact``).

Also the npz reading shared with the PFP parameters (:mod:`pfp.artifacts.pfp_params`).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pfp.artifacts.header import (
    HEADER_KEY,
    ArtifactError,
    ArtifactHeader,
    ArtifactKind,
    PathLike,
    accept,
    describe,
    header_entry,
    model_name,
    read_npz_header,
)
from pfp.bnn import Posterior, PosteriorError, site_names
from pfp.io import atomic_savez
from pfp.spec import LAYER_KINDS, ModelSpec, SpecError

#: the npz entry holding the model description (ModelSpec JSON)
SPEC_KEY = "spec"


class ParameterFileError(ArtifactError, PosteriorError):
    """A posterior or PFP parameter file is refused (a ``PosteriorError``, as these always were)."""


def read_parameter_archive(kind: ArtifactKind, path: PathLike, model: Optional[str],
                           parent: Optional[PathLike]) -> tuple[ArtifactHeader, ModelSpec, dict[str, np.ndarray], str]:
    """Header (checked), spec and arrays of an npz artifact, and the prefix of its messages."""
    path = Path(path)
    if not path.is_file():
        raise ParameterFileError(f"{describe(path, kind.title, None, model)}: {kind.title} not found"
                                 f"; run the {kind.stage}@{model or 'MODEL'} stage first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = read_npz_header(archive)
            if SPEC_KEY not in archive.files:
                raise ParameterFileError(f"{describe(path, kind.title, None, model)}: no model description "
                                         f"(entry {SPEC_KEY!r}); re-run the {kind.stage}@{model or 'MODEL'} stage")
            spec_text = archive[SPEC_KEY]
            arrays = {key: archive[key] for key in archive.files if key not in (SPEC_KEY, HEADER_KEY)}
    except ParameterFileError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as problem:
        raise ParameterFileError(f"{describe(path, kind.title, None, model)}: not a readable {kind.title} ({problem})") from None
    spec = read_spec(spec_text, f"{describe(path, kind.title, None, model)}: entry {SPEC_KEY!r}")
    header = accept(kind, path, header, model, parent, ParameterFileError)
    where = describe(path, kind.title, header.model, model)
    if spec.name != header.model:
        raise ParameterFileError(f"{where}: its spec describes model {spec.name!r}; the file is inconsistent, "
                                 f"re-run the {kind.stage}@{header.model} stage")
    return header, spec, arrays, where


def read_spec(entry: np.ndarray, where: str) -> ModelSpec:
    """The model description stored in an artifact (a JSON string entry), every field checked: the
    right JSON types, known layer kinds, positive sizes, and layers that fit together; else a
    ``ParameterFileError`` naming ``where`` and the key."""
    def refuse(problem: str) -> ParameterFileError:
        return ParameterFileError(f"{where}: {problem}")

    if entry.dtype.kind != "U" or entry.shape != ():
        raise refuse(f"not a JSON text (a {entry.dtype} array of shape {entry.shape})")
    try:
        raw = json.loads(str(entry))
    except json.JSONDecodeError as error:
        raise refuse(f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise refuse(f"must be a JSON object, got {type(raw).__name__}")
    if missing := sorted({"name", "input_shape", "layers"} - set(raw)):
        raise refuse(f"missing key(s) {', '.join(missing)}")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise refuse(f"name must be the model's name, got {raw['name']!r}")
    shape = raw["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        raise refuse(f"input_shape must be 3 positive integers (C, H, W), got {shape!r}")
    if not isinstance(raw["layers"], list) or not raw["layers"]:
        raise refuse(f"layers must be a non-empty list, got {raw['layers']!r}")
    for index, layer in enumerate(raw["layers"]):
        if not isinstance(layer, dict):
            raise refuse(f"layers[{index}] must be an object (a layer with its kind), got {layer!r}")
        if layer.get("kind") not in LAYER_KINDS:
            raise refuse(f"layers[{index}].kind: unknown layer kind {layer.get('kind')!r} "
                         f"(one of {', '.join(sorted(LAYER_KINDS))})")
        types = {f.name: f.type for f in dataclasses.fields(LAYER_KINDS[layer["kind"]])}
        for key, value in layer.items():
            if types.get(key) in (int, "int") and not (type(value) is int and value >= (0 if key == "padding" else 1)):
                raise refuse(f"layers[{index}].{key} must be a {'non-negative' if key == 'padding' else 'positive'} "
                             f"integer, got {value!r}")
            if types.get(key) in (str, "str") and not isinstance(value, str):
                raise refuse(f"layers[{index}].{key} must be a string, got {value!r}")
    try:
        spec = ModelSpec.from_json(str(entry))
        spec.output_shapes()  # the layers fit together
    except (SpecError, TypeError, ValueError, KeyError) as error:
        raise refuse(str(error)) from None
    return spec


def checked_array(arrays: dict[str, np.ndarray], key: str, shape: tuple, where: str) -> np.ndarray:
    """``arrays[key]``, refused when missing, of another shape than the spec's, or not finite."""
    if key not in arrays:
        raise ParameterFileError(f"{where}: missing array {key!r}")
    if tuple(arrays[key].shape) != tuple(shape):
        raise ParameterFileError(f"{where}: {key} has shape {arrays[key].shape}, spec says {shape}")
    if not np.all(np.isfinite(arrays[key])):
        raise ParameterFileError(f"{where}: {key} contains NaN or infinite values")
    return arrays[key]


def save_posterior(posterior: Posterior, path: PathLike, *, parent: Optional[PathLike] = None) -> ArtifactHeader:
    """Write the posterior atomically.

    Parameters
    ----------
    posterior
        The trained posterior; its spec name is the model the file belongs to.
    path
        Where to write.
    parent
        The file it was made from (the prepared data's manifest), or None.

    Returns
    -------
    ArtifactHeader
        The header written.
    """
    header = ArtifactHeader.for_kind(ArtifactKind.POSTERIOR, posterior.spec.name, parent)
    arrays = {HEADER_KEY: header_entry(header), SPEC_KEY: np.array(posterior.spec.to_json())}
    for name in posterior.loc:
        arrays[f"{name}.loc"] = posterior.loc[name].detach().cpu().numpy().astype(np.float32)
        arrays[f"{name}.scale"] = posterior.scale[name].detach().cpu().numpy().astype(np.float32)
    atomic_savez(path, arrays)
    return header


def load_posterior(path: PathLike, model: Optional[str], *, parent: Optional[PathLike] = None) -> Posterior:
    """Read and validate the posterior of ``model`` (None: whichever model it belongs to).

    Refuses (``PosteriorError``) a missing or unreadable file, one without a header or of another
    kind or model, a missing array, a shape the spec does not give, NaN / infinite values and
    non-positive scales; with ``parent``, a posterior made from another file.
    """
    _, spec, arrays, where = read_parameter_archive(ArtifactKind.POSTERIOR, path,
                                                    None if model is None else model_name(model), parent)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            site_loc = checked_array(arrays, f"{site}.loc", shape, where)
            site_scale = checked_array(arrays, f"{site}.scale", shape, where)
            if np.any(site_scale <= 0):
                bad = int(np.sum(site_scale <= 0))
                raise ParameterFileError(f"{where}: {site}.scale has {bad} non-positive value(s); scales must be > 0")
            loc[site], scale[site] = torch.from_numpy(site_loc), torch.from_numpy(site_scale)
    return Posterior(spec=spec, loc=loc, scale=scale)
