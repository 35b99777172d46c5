"""POST /invocations of the served champion: the runtime's numbers, and HTTP 400 with the reason for bad input."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import pytest

from pfp_runtime import load_bundle
from tests.common import assert_served_predictions
from tests.servers import real_images

IMAGES = real_images(9, start=20)  # 9 = 4 + 4 + 1: the bundle's chunking runs too


def _post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"message": text}


def test_served_batch_is_the_runtime_prediction(endpoint, lenet_bundle):
    runtime = load_bundle(lenet_bundle)
    x01 = (IMAGES / 255.0).astype(np.float32)
    # floats 0-1, as JSON numbers
    status, body = _post(endpoint, {"inputs": x01.tolist()})
    assert status == 200, body
    assert_served_predictions(body["predictions"], runtime.predict(x01).to_dict())
    # integer pixels 0-255 with the pixels parameter: the runtime's numbers for the uint8 images
    status, body = _post(endpoint, {"inputs": IMAGES.tolist(), "params": {"pixels": "0-255"}})
    assert status == 200, body
    assert_served_predictions(body["predictions"], runtime.predict(IMAGES).to_dict())
    assert body["predictions"]["predicted"] == np.argmax(body["predictions"]["probs"], axis=1).tolist()
    # one image; the "instances" form as well
    status, body = _post(endpoint, {"instances": x01[:1].tolist()})
    assert status == 200 and np.asarray(body["predictions"]["probs"]).shape == (1, 10)


def _image(value=0.0) -> list:
    return np.full((28, 28), value, dtype=np.float64).tolist()


def _with_pixel(value) -> list:
    image = _image(0.5)
    image[3][4] = value
    return [image]


BAD_REQUESTS = {
    # MLflow's own parsing and schema enforcement, before the model runs
    "wrong shape": ({"inputs": [np.zeros((27, 28)).tolist()]}, "does not match expected shape (-1, 28, 28)"),
    "one image without the batch axis": ({"inputs": _image()}, "does not match expected shape (-1, 28, 28)"),
    "ragged rows": ({"inputs": [[[0.0] * 28] * 27 + [[0.0] * 27]]}, "inhomogeneous"),
    "strings for pixels": ({"inputs": [[["a"] * 28] * 28]}, "could not convert string to float"),
    "no inputs key": ({"images": [_image()]}, "inputs"),
    # JSON's [] has no shape: MLflow's schema check refuses it (an empty (0, 28, 28) array in-process gets the runtime's
    # "images: empty batch", tests/test_mlflow_model.py)
    "empty batch": ({"inputs": []}, "Failed to enforce schema of data '[]'"),
    # the runtime's checks
    "NaN pixel": ({"inputs": _with_pixel(math.nan)}, "images: 1 pixel value(s) are NaN or infinite"),
    "infinite pixel": ({"inputs": _with_pixel(math.inf)}, "images: 1 pixel value(s) are NaN or infinite"),
    "negative pixel": ({"inputs": _with_pixel(-0.25)}, "images: values from -0.25 to 0.5, expected 0 to 1"),
    "pixels 0-255 without the parameter": ({"inputs": IMAGES[:2].tolist()}, '"params": {"pixels": "0-255"}'),
    "pixel over 255": ({"inputs": [[[300] * 28] * 28], "params": {"pixels": "0-255"}}, "values from 300 to 300, expected 0 to 255"),
    "fractions as 0-255": ({"inputs": _with_pixel(0.5), "params": {"pixels": "0-255"}}, "expects whole numbers 0-255"),
    "unknown pixels parameter": ({"inputs": [_image()], "params": {"pixels": "0-65535"}}, "pixels='0-65535'"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_input_is_a_400_with_the_reason_and_the_server_keeps_answering(endpoint, kind):
    body, reason = BAD_REQUESTS[kind]
    status, answer = _post(endpoint, body)
    assert status == 400, (kind, status, answer)
    assert reason in answer.get("message", ""), (kind, answer)
    status, answer = _post(endpoint, {"inputs": [_image(0.25)]})
    assert status == 200 and len(answer["predictions"]["probs"]) == 1


def test_a_request_that_is_not_json_is_a_400(endpoint):
    status, answer = _post(endpoint, b"{not json", "application/json")
    assert status == 400, answer
    status, _ = _post(endpoint, {"inputs": [_image(0.25)]})
    assert status == 200
