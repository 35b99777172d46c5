"""The bundle predictor against an independent oracle (torch PFP + numpy head), its input checks and batching."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pfp.convert import convert_posterior, predict_pfp
from pfp.data.dirty_mnist import normalise
from pfp.head import head_draws, head_reference
from pfp_runtime import InputError, load_bundle
from pfp_runtime.predictor import chunk_plan

from ..common import random_posterior

IMAGES = np.random.default_rng(7).integers(0, 256, (9, 28, 28), dtype=np.uint8)


def _oracle(built, model: str, seed: int, images: np.ndarray) -> dict[str, np.ndarray]:
    meta = built.metadata
    pfp_model = convert_posterior(random_posterior(model, seed))
    mean, var = predict_pfp(pfp_model, normalise(images), variance_scale=meta["calibration"]["variance_scale"])
    mean, var = mean.numpy(), var.numpy()
    head = head_reference(mean, var, head_draws(meta["head"]["draws"], 10, seed=meta["head"]["seed"]),
                          meta["calibration"]["temperature"])
    return {"logit_mean": mean, "logit_var": var, **head}


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_predictions_match_the_torch_pfp_and_the_numpy_head(model, mlp_bundle, lenet_bundle):
    built, seed = (mlp_bundle, 0) if model == "mlp" else (lenet_bundle, 3)
    prediction = load_bundle(built.folder, expected_model=model).predict(IMAGES)
    expected = _oracle(built, model, seed, IMAGES)
    for name in ("logit_mean", "logit_var"):
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(getattr(prediction, name), expected[name], atol=1e-4 * scale, err_msg=name)
    for name in ("probs", "mi", "sme"):
        np.testing.assert_allclose(getattr(prediction, name), expected[name], atol=2e-5, err_msg=name)
    np.testing.assert_array_equal(prediction.predicted, expected["probs"].argmax(axis=1))
    threshold = built.metadata["ood"]["threshold"]
    np.testing.assert_array_equal(prediction.ood, prediction.mi > threshold)
    assert len(prediction) == 9 and prediction.predicted.dtype.kind == "i"


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 9])
def test_any_batch_size_gives_the_same_rows(mlp_bundle, count):
    predictor = load_bundle(mlp_bundle.folder)
    whole = predictor.predict(IMAGES)
    part = predictor.predict(IMAGES[:count])
    for name in ("probs", "logit_mean", "logit_var", "mi", "sme"):
        np.testing.assert_allclose(getattr(part, name), getattr(whole, name)[:count], rtol=1e-6, atol=1e-7)


def test_uint8_float_and_channel_layouts_agree(mlp_bundle):
    predictor = load_bundle(mlp_bundle.folder)
    reference = predictor.predict(IMAGES)
    for images in (IMAGES / 255.0, (IMAGES / 255.0).astype(np.float32), IMAGES[:, None], IMAGES.astype(np.int64),
                   IMAGES.tolist()):
        np.testing.assert_allclose(predictor.predict(images).probs, reference.probs, atol=1e-6)
    np.testing.assert_allclose(predictor.predict(IMAGES[0]).probs, reference.probs[:1], atol=1e-6)


def test_chunk_plan_pads_or_splits_whichever_computes_less():
    assert chunk_plan(1, [1, 100]) == [1]
    assert chunk_plan(250, [1, 100]) == [100, 100] + [100]  # 50 left: one padded call, not 50 single ones
    assert chunk_plan(3, [1, 100]) == [1, 1, 1]
    assert chunk_plan(7, [1, 4]) == [4, 4]
    assert chunk_plan(5, [1, 4]) == [4, 1]
    assert chunk_plan(3, [4]) == [4]
    assert sum(chunk_plan(1234, [1, 10, 100])) >= 1234


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 28, 27), np.uint8), r"shape \(2, 28, 27\), expected \(N, 28, 28\)"),
    (np.zeros((2, 3, 28, 28), np.uint8), r"shape \(2, 3, 28, 28\)"),
    (np.zeros((784,), np.uint8), r"shape \(784,\)"),
    (np.zeros((0, 28, 28), np.uint8), "empty batch"),
    (np.zeros((1, 28, 28), np.complex64), "dtype complex64 not supported"),
    (np.zeros((1, 28, 28), bool), "dtype bool not supported"),
    (np.full((1, 28, 28), "a"), "dtype <U1 not supported"),
    (np.full((1, 28, 28), np.nan, np.float32), "784 pixel value\\(s\\) are NaN or infinite"),
    (np.where(np.eye(28, dtype=bool), np.inf, 0.5)[None], "28 pixel value\\(s\\) are NaN or infinite"),
    (np.full((1, 28, 28), 1.5), "values from 1.5 to 1.5, expected 0 to 1.0"),
    (np.full((1, 28, 28), 200.0), "give them as integers"),
    (np.full((1, 28, 28), -0.1), "values from -0.1"),
    (np.full((1, 28, 28), 256, np.int64), "values from 256 to 256, expected 0 to 255"),
    ([[0.0] * 28] * 27 + [[0.0] * 27], "not a rectangular array"),
])
def test_bad_images_are_refused_with_the_problem_named(mlp_bundle, images, message):
    predictor = load_bundle(mlp_bundle.folder)
    with pytest.raises(InputError, match=message):
        predictor.predict(images)
    assert predictor.predict(IMAGES[:1]).probs.shape == (1, 10)  # still serving


def test_threads_setting(mlp_bundle, monkeypatch):
    assert load_bundle(mlp_bundle.folder, threads=1).threads == 1
    monkeypatch.setenv("PFP_RUNTIME_THREADS", "1")
    assert load_bundle(mlp_bundle.folder).describe()["threads"] == 1
    with pytest.raises(ValueError, match="threads must be >= 1"):
        load_bundle(mlp_bundle.folder, threads=0)


def test_the_runtime_imports_no_torch_no_tvm_package_no_compiler(mlp_bundle, tmp_path):
    """In a fresh interpreter: load and predict, then look at what got imported."""
    np.save(tmp_path / "x.npy", IMAGES)
    script = f"""
import json, sys
import numpy as np
from pfp_runtime import load_bundle
p = load_bundle({str(mlp_bundle.folder)!r}).predict(np.load({str(tmp_path / 'x.npy')!r}))
roots = sorted({{name.split('.')[0] for name in sys.modules}})
print(json.dumps({{"roots": roots, "probs": p.probs.tolist()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    forbidden = {"torch", "tvm", "pyro", "pfp", "scipy", "mlflow"} & set(report["roots"])
    assert not forbidden, f"the runtime imported {sorted(forbidden)}"
    assert "tvm_ffi" in report["roots"]
    np.testing.assert_allclose(report["probs"], load_bundle(mlp_bundle.folder).predict(IMAGES).probs, atol=1e-7)
