"""A PFP bundle as an MLflow model: ``mlflow.pyfunc`` around :mod:`pfp_runtime`.

The logged model holds the bundle folder as its artifact ``bundle``; loading it loads the bundle
with :func:`pfp_runtime.load_bundle` (checksums, architecture and CPU features checked), and
``predict`` is the runtime's: a dict of numpy arrays ``probs`` (N, C), ``predicted`` (N,),
``logit_mean``, ``logit_var`` (N, C), ``mi``, ``sme`` (N,) and ``ood`` (N,) bool, the same numbers
as ``load_bundle(bundle).predict(images)``.

Input (the signature): float32 images (N, 28, 28), pixels 0-1. Pixels 0-255 (what a client
usually has, and what JSON integers become) are accepted with the parameter
``pixels="0-255"``::

    mlflow.pyfunc.load_model("models:/pfp-lenet@champion").predict(images01)
    mlflow.pyfunc.load_model(uri).predict(images255.astype("float32"), params={"pixels": "0-255"})
    curl -d '{"inputs": [[[0, 12, 255, ...], ...]], "params": {"pixels": "0-255"}}' \\
        -H 'Content-Type: application/json' http://HOST:PORT/invocations

At most :data:`MAX_IMAGES` (4096) images per call, more are refused (``$PFP_SERVING_MAX_IMAGES``
sets another limit; an invalid value stops the model from loading). MLflow's scoring server
parses a whole body before the model sees it, so the limit bounds what the server computes and
answers, not what it parses: measured on the 2-core dev machine, a 4096-image request (15 MB of
JSON) took 2-6 s (quiet to busy host) and the server's RSS settled about 90 MB above its 430 MB at start, while
50 000 images (180 MB of JSON, accepted before the limit) took 56 s and grew it to 790 MB.
Refused input (wrong shape or dtype, NaN/inf, values out of range, an empty batch, too many images) raises
:class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE`` and the runtime's
message, which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

__all__ = ["BUNDLE_ARTIFACT", "IMAGE_SHAPE", "MAX_IMAGES", "MAX_IMAGES_ENV", "OUTPUTS", "PIXELS_PARAM", "PIXELS_0_1", "PIXELS_0_255",
           "PFPBundleModel", "bundle_signature", "example_images", "log_bundle_model"]

BUNDLE_ARTIFACT = "bundle"
IMAGE_SHAPE = (28, 28)
PIXELS_PARAM = "pixels"
PIXELS_0_1, PIXELS_0_255 = "0-1", "0-255"
#: what ``predict`` returns, in order (the runtime's Prediction fields)
OUTPUTS = ("probs", "predicted", "logit_mean", "logit_var", "mi", "sme", "ood")
#: images per predict call (a request) unless $PFP_SERVING_MAX_IMAGES says otherwise; more are refused
MAX_IMAGES = 4096
MAX_IMAGES_ENV = "PFP_SERVING_MAX_IMAGES"
_EXACT_FLOAT = 2.0 ** 24  # float32 holds every integer up to here exactly


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _pixels(params: Mapping[str, Any] | None) -> str:
    pixels = (params or {}).get(PIXELS_PARAM, PIXELS_0_1)
    if pixels not in (PIXELS_0_1, PIXELS_0_255):
        raise _invalid(f"params: {PIXELS_PARAM}={pixels!r}, expected {PIXELS_0_1!r} (floats 0-1) or {PIXELS_0_255!r} (whole numbers 0-255)")
    return pixels


def _max_images() -> int:
    text = os.environ.get(MAX_IMAGES_ENV)
    if text is None:
        return MAX_IMAGES
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:  # found when the model loads: the server does not start
        raise ValueError(f"${MAX_IMAGES_ENV}={text!r}: expected a positive whole number of images")
    return limit


def _check_count(images: np.ndarray, limit: int) -> None:
    """More images than one call may hold: refused before the runtime computes (and the server answers) them all."""
    if images.ndim >= 3 and images.shape[0] > limit:
        raise _invalid(f"images: {images.shape[0]} images in one request, at most {limit}; send them in several requests "
                       f"(the limit is ${MAX_IMAGES_ENV} of the server)")


def _as_pixels_0_255(images: np.ndarray) -> np.ndarray:
    """Float images holding whole numbers 0-255 (JSON integers) as int64, for the runtime's integer path."""
    finite = np.isfinite(images)
    if not finite.all():
        return images  # the runtime names the NaN/inf pixels
    if images.size and float(np.abs(images).max()) >= _EXACT_FLOAT:
        raise _invalid(f"images: values from {images.min()} to {images.max()}, expected 0 to 255 ({PIXELS_PARAM}={PIXELS_0_255!r})")
    if not np.array_equal(images, np.round(images)):
        raise _invalid(f"images: {PIXELS_PARAM}={PIXELS_0_255!r} expects whole numbers 0-255; "
                       f"found fractions (send pixels 0-1 without the {PIXELS_PARAM} parameter, or round them)")
    return images.astype(np.int64)


def _check_unit_range(images: np.ndarray) -> None:
    """Pixels 0-255 sent as 0-1 images: say how to send them (the runtime's own hint is for numpy callers)."""
    if images.dtype.kind != "f" or not images.size or not np.isfinite(images).all():
        return
    lowest, highest = float(images.min()), float(images.max())
    if lowest >= 0 and 1 < highest <= 255:
        param = f'{{"{PIXELS_PARAM}": "{PIXELS_0_255}"}}'
        raise _invalid(f"images: values from {lowest:g} to {highest:g}, expected 0 to 1; for pixels 0-255 pass params {param} "
                       f'(JSON: add "params": {param})')


class PFPBundleModel(mlflow.pyfunc.PythonModel):
    """The bundle artifact loaded by :mod:`pfp_runtime`; ``predict`` is the runtime's predict."""

    def load_context(self, context) -> None:
        from pfp_runtime import load_bundle

        config = context.model_config or {}
        self._max_images = _max_images()
        self._predictor = load_bundle(context.artifacts[BUNDLE_ARTIFACT], expected_model=config.get("model"))

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        from pfp_runtime import InputError

        pixels = _pixels(params)
        if hasattr(model_input, "to_numpy"):  # a DataFrame when called without the signature's enforcement
            model_input = model_input.to_numpy()
        try:
            images = np.asarray(model_input)
        except (TypeError, ValueError) as error:
            raise _invalid(f"images: not an array ({error})") from None
        _check_count(images, self._max_images)
        if pixels == PIXELS_0_255 and images.dtype.kind == "f":
            images = _as_pixels_0_255(images)
        elif pixels == PIXELS_0_1:
            _check_unit_range(images)
        try:
            prediction = self._predictor.predict(images)
        except InputError as error:
            raise _invalid(str(error)) from None
        return prediction.to_dict()


def bundle_signature(classes: int) -> ModelSignature:
    """Float32 images (N, 28, 28), the ``pixels`` parameter, and the seven named outputs."""
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "probs"), TensorSpec(np.dtype(np.int64), (-1,), "predicted"),
                      TensorSpec(np.dtype(np.float32), (-1, classes), "logit_mean"),
                      TensorSpec(np.dtype(np.float32), (-1, classes), "logit_var"),
                      TensorSpec(np.dtype(np.float32), (-1,), "mi"), TensorSpec(np.dtype(np.float32), (-1,), "sme"),
                      TensorSpec(np.dtype(np.bool_), (-1,), "ood")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec(PIXELS_PARAM, "string", PIXELS_0_1)]))


def example_images(images: np.ndarray, count: int = 3) -> np.ndarray:
    """The first ``count`` of ``images`` (uint8 0-255 or float 0-1, (N, 28, 28) or (N, 1, 28, 28)) as float32 0-1."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] == 0:
        raise ValueError(f"example images: shape {images.shape}, expected (N, 28, 28) with N >= 1")
    chosen = images[:count]
    scale = 1.0 / 255.0 if chosen.dtype.kind in "ui" else 1.0
    return (chosen.astype(np.float64) * scale).astype(np.float32)


def _requirements() -> list[str]:
    """The serving environment's packages (given, so MLflow need not load the model in a subprocess to guess them)."""
    pins = []
    for name in ("mlflow", "numpy", "apache-tvm-ffi", "apache-tvm"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def log_bundle_model(bundle_dir: str | Path, *, images: np.ndarray, name: str = "model", registered_model_name: str | None = None,
                     tags: Mapping[str, Any] | None = None):
    """Log the bundle in ``bundle_dir`` as a pyfunc model of the active run (one is started when none is); returns its ``ModelInfo``.

    ``images``: a few real images for the input example (the first three are kept). The bundle
    is loaded and checked here first, so a broken bundle fails before anything is logged.
    """
    from pfp_runtime import load_bundle

    bundle_dir = Path(bundle_dir)
    predictor = load_bundle(bundle_dir)
    example = example_images(images)
    predictor.predict(example)  # the example runs, or logging stops here with the runtime's message
    meta = predictor.bundle.metadata
    return mlflow.pyfunc.log_model(
        name=name, python_model=PFPBundleModel(), artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        model_config={"model": meta["model"]}, signature=bundle_signature(predictor.bundle.classes), input_example=example,
        pip_requirements=_requirements(), registered_model_name=registered_model_name,
        tags={"pfp.model": meta["model"], "pfp.target": str(meta["target"].get("name")), **{k: str(v) for k, v in (tags or {}).items()}},
    )
