"""The MLflow model of a bundle: logged on a real tracking server, loaded back with ``mlflow.pyfunc.load_model``.

Its predictions are the runtime's (same numbers), and every refused input is an
``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 when served) and a message
naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from pfp.mlflow_model import BUNDLE_ARTIFACT, OUTPUTS, PIXELS_0_255, PIXELS_PARAM, log_bundle_model
from pfp_runtime import BundleError, load_bundle
from tests.servers import real_images

IMAGES = real_images(7)  # 7 = one batch of 4 + padding: the bundle's chunking runs too


@pytest.fixture(scope="module")
def logged(mlflow_server, lenet_bundle):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("pfp-mlflow-model-tests")
    with mlflow.start_run(run_name="log-bundle") as run:
        info = log_bundle_model(lenet_bundle, images=real_images(3, start=100))
    return info, run.info.run_id


@pytest.fixture(scope="module")
def loaded(logged):
    return mlflow.pyfunc.load_model(logged[0].model_uri)


@pytest.fixture(scope="module")
def runtime(lenet_bundle):
    return load_bundle(lenet_bundle)


def _assert_same(served: dict, expected: dict) -> None:
    assert set(served) == set(OUTPUTS)
    for name in OUTPUTS:
        got, want = np.asarray(served[name]), np.asarray(expected[name])
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_logged_model_signature_and_example(logged, lenet_bundle):
    info, run_id = logged
    signature = info.signature
    assert [(spec.type, spec.shape) for spec in signature.inputs.inputs] == [(np.dtype("float32"), (-1, 28, 28))]
    assert signature.outputs.input_names() == list(OUTPUTS)
    assert signature.params.params[0].name == PIXELS_PARAM and signature.params.params[0].default == "0-1"
    # the input example: three real digits as float32 0-1
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    example = mlflow.models.Model.load(model_dir).load_input_example(model_dir)
    np.testing.assert_allclose(example, real_images(3, start=100) / 255.0, atol=1e-7)
    assert example.dtype == np.float32
    # the bundle travels with the model, byte for byte
    meta = mlflow.models.Model.load(model_dir)
    local = model_dir / meta.flavors["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in Path(lenet_bundle).iterdir())
    assert (local / "SHA256SUMS").read_bytes() == (Path(lenet_bundle) / "SHA256SUMS").read_bytes()


def test_pyfunc_predictions_are_the_runtime_predictions(loaded, runtime):
    x01 = (IMAGES / 255.0).astype(np.float32)
    _assert_same(loaded.predict(x01), runtime.predict(x01).to_dict())
    # pixels 0-255 (what JSON integers become): the runtime's numbers for the uint8 images
    _assert_same(loaded.predict(IMAGES.astype(np.float32), params={PIXELS_PARAM: PIXELS_0_255}), runtime.predict(IMAGES).to_dict())
    result = loaded.predict(x01[:1])
    assert result["probs"].shape == (1, 10) and np.allclose(result["probs"].sum(axis=1), 1.0, atol=1e-5)
    assert result["predicted"][0] == result["probs"][0].argmax()


def _refused(loaded, images, params=None) -> str:
    with pytest.raises(MlflowException) as caught:
        loaded.predict(images, params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE", caught.value.message
    assert caught.value.get_http_status_code() == 400
    return caught.value.message


def test_bad_input_is_refused_with_the_reason(loaded):
    x = (IMAGES / 255.0).astype(np.float32)
    # MLflow's schema enforcement, before our code: shape and dtype
    assert "Shape of input (7, 27, 28) does not match expected shape (-1, 28, 28)" in _refused(loaded, x[:, :27])
    assert "dtype of input float64 does not match expected dtype float32" in _refused(loaded, x.astype(np.float64))
    assert "dtype of input uint8 does not match expected dtype float32" in _refused(loaded, IMAGES)
    # the runtime's checks
    assert "images: empty batch (0 images)" in _refused(loaded, x[:0])
    nan = x.copy()
    nan[0, 3, 4], nan[2, 0, 0] = np.nan, np.inf
    assert "images: 2 pixel value(s) are NaN or infinite" in _refused(loaded, nan)
    assert "values from -0.5 to" in _refused(loaded, x - 0.5)
    # pixels 0-255 sent as 0-1: how to send them
    message = _refused(loaded, IMAGES.astype(np.float32))
    assert "expected 0 to 1" in message and '"pixels": "0-255"' in message
    # pixels 0-255: whole numbers in range
    over = np.zeros((1, 28, 28), np.float32)
    over[0, 5, 5] = 300
    assert "values from 0 to 300, expected 0 to 255" in _refused(loaded, over, {PIXELS_PARAM: PIXELS_0_255})
    assert "expects whole numbers 0-255" in _refused(loaded, IMAGES.astype(np.float32) + 0.5, {PIXELS_PARAM: PIXELS_0_255})
    assert "pixels='0-100'" in _refused(loaded, x, {PIXELS_PARAM: "0-100"})
    # and the model still predicts
    assert loaded.predict(x[:2])["probs"].shape == (2, 10)


def test_a_broken_bundle_is_not_logged(tmp_path, lenet_bundle, mlflow_server):
    broken = tmp_path / "broken"
    shutil.copytree(lenet_bundle, broken)
    meta = json.loads((broken / "bundle.json").read_text())
    meta["calibration"]["temperature"] = 2.0
    (broken / "bundle.json").write_text(json.dumps(meta))
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run(run_name="broken-bundle") as run:
        with pytest.raises(BundleError, match="bundle.json: checksum mismatch"):
            log_bundle_model(broken, images=IMAGES)
    assert not mlflow.MlflowClient(mlflow_server).list_artifacts(run.info.run_id)
    with pytest.raises(ValueError, match=r"example images: shape \(3, 28\)"):
        log_bundle_model(lenet_bundle, images=IMAGES[0, :3])
