"""Reliability of the served model and the runtime predictor under bad and concurrent input (issue 22).

One real ``mlflow models serve`` process serves the LeNet test bundle (registered here as
``pfp-reliability-lenet@champion``, so the registry tests' ``pfp-lenet`` is left alone); the same
bundle is loaded in-process as the reference: every good answer must be the runtime's numbers.
Bad input goes to the three surfaces a user has: ``Predictor.predict``, ``pfp predict`` and POST
/invocations; each must be a clear refusal (InputError / exit 1 with one line / HTTP 400 with the
reason), never a traceback, a 500 or a wrong answer.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import tracemalloc
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis
import mlflow
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pfp.mlflow_model import MAX_IMAGES, MAX_IMAGES_ENV, OUTPUTS, log_bundle_model
from pfp_runtime import InputError, load_bundle
from pfp_runtime import cli as pfp_cli
from tests.common import assert_served_predictions
from tests.reliability.report import record
from tests.servers import mlflow_model_server, real_images

MODEL_NAME = "pfp-reliability-lenet"
#: how much the serving process tree's RSS may grow over the burst: it starts at about 430 MB (the model, MLflow,
#: FastAPI); the burst (96 good, 32 bad requests of which four are refused 1025-image bodies) measured +48 MB
BURST_RSS_GROWTH_MB = 150
IMAGES = real_images(64, start=100)
#: the served model's image limit here ($PFP_SERVING_MAX_IMAGES; the default, MAX_IMAGES, costs seconds a request to test)
SERVED_LIMIT = 1024


# -- fixtures


@pytest.fixture(scope="module")
def runtime(lenet_bundle):
    return load_bundle(lenet_bundle)


@pytest.fixture(scope="module")
def champion(mlflow_server, lenet_bundle):
    """The bundle logged and registered as ``pfp-reliability-lenet`` (alias champion); its model URI."""
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    if client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.delete_registered_model(MODEL_NAME)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("pfp-reliability-serving")
    with mlflow.start_run(run_name="publish@lenet"):
        info = log_bundle_model(lenet_bundle, images=real_images(3), registered_model_name=MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    yield f"models:/{MODEL_NAME}@champion"
    client.delete_registered_model(MODEL_NAME)


@pytest.fixture(scope="module")
def served(mlflow_server, champion, tmp_path_factory):
    """``mlflow models serve`` of the champion, at most SERVED_LIMIT images a request; its URL."""
    log = tmp_path_factory.mktemp("reliability-serving") / "serve.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(MAX_IMAGES_ENV, str(SERVED_LIMIT))  # inherited by the server
        with mlflow_model_server(champion, mlflow_server, log) as url:
            yield url


# -- helpers


def _post(url: str, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _body(inputs, pixels: str | None = None) -> bytes:
    payload = {"inputs": inputs} if pixels is None else {"inputs": inputs, "params": {"pixels": pixels}}
    return json.dumps(payload).encode()


def _refusal(status: int, raw: bytes) -> str:
    """The reason of a proper refusal (400, a JSON message, no traceback); fails otherwise."""
    text = raw.decode(errors="replace")
    assert status == 400, (status, text[:2000])
    assert "Traceback" not in text and "unexpected error" not in text, text[:2000]
    return json.loads(text)["message"]


def _assert_runtime_numbers(raw: bytes, expected: dict) -> None:
    assert_served_predictions(json.loads(raw)["predictions"], expected)


def _server_tree_rss_mb(url: str) -> float:
    """RSS of the model server and every process of its session (``mlflow models serve`` and its uvicorn), from /proc."""
    port = url.rsplit(":", 1)[1].encode()
    sessions = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if port in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                sessions.add(os.getsid(int(pid)))
        except OSError:
            continue
    assert sessions, f"no server process with port {port.decode()} on its command line"
    total_kb = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) not in sessions:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


def _image(value: float = 0.5) -> list:
    return np.full((28, 28), value).tolist()


def _with_pixel(value) -> bytes:
    """One 0-1 image with one pixel set to ``value`` as JSON text (NaN / Infinity are Python's JSON extensions)."""
    image = _image()
    image[3][4] = value
    return json.dumps({"inputs": [image]}).encode()


# -- 1. a burst of concurrent requests, a quarter malformed

#: (body, the reason the refusal must give); each sent BAD_REPEAT times in the burst
BAD_REQUESTS = {
    "wrong shape": (_body([np.zeros((27, 28)).tolist()]), "does not match expected shape (-1, 28, 28)"),
    "strings": (_body([[["a"] * 28] * 28]), "could not convert string to float"),
    "NaN pixel": (_with_pixel(math.nan), "images: 1 pixel value(s) are NaN or infinite"),
    "empty batch": (_body([]), "Failed to enforce schema of data '[]'"),
    "invalid JSON": (b'{"inputs": [[[0.5, 0.5', "Ensure that input is a valid JSON formatted string"),
    "huge batch": (_body(np.zeros((SERVED_LIMIT + 1, 28, 28), np.uint8).tolist(), "0-255"),
                   f"images: {SERVED_LIMIT + 1} images in one request, at most {SERVED_LIMIT}"),
    "out of range": (_body([_image(2.5)]), "expected 0 to 1"),
    "ragged rows": (_body([[[0.0] * 28] * 27 + [[0.0] * 27]]), "inhomogeneous"),
}
BAD_REPEAT = 4
GOOD_COUNT = 3 * BAD_REPEAT * len(BAD_REQUESTS)  # 96 good + 32 bad: a quarter malformed


def _good_requests(runtime) -> list[tuple[bytes, dict]]:
    """(body, expected answer): 1-9 real digits each (the bundle's chunking too), half as floats 0-1, half as pixels 0-255."""
    requests = []
    for i in range(GOOD_COUNT):
        count, start = 1 + i % 9, (7 * i) % (len(IMAGES) - 9)
        pixels = IMAGES[start:start + count]
        if i % 2:
            requests.append((_body(pixels.tolist(), "0-255"), runtime.predict(pixels).to_dict()))
        else:
            x01 = (pixels / 255.0).astype(np.float32)
            requests.append((_body(x01.tolist()), runtime.predict(x01).to_dict()))
    return requests


def test_a_burst_of_concurrent_requests_is_answered_right_and_the_server_survives(served, runtime):
    good = _good_requests(runtime)
    bad = [(kind, body, reason) for kind, (body, reason) in BAD_REQUESTS.items() for _ in range(BAD_REPEAT)]
    jobs = [("good", i) for i in range(len(good))] + [("bad", i) for i in range(len(bad))]
    random.Random(22).shuffle(jobs)
    status, _ = _post(served, good[0][0])  # warm: the first request pays for lazy imports, not the burst
    assert status == 200
    rss_before = _server_tree_rss_mb(served)

    def send(job):
        kind, i = job
        return job, _post(served, good[i][0] if kind == "good" else bad[i][1], timeout=300)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(send, jobs))
    rss_after = _server_tree_rss_mb(served)

    answered = refused = 0
    for (kind, i), (status, raw) in answers:
        if kind == "good":
            assert status == 200, (i, status, raw[:500])
            _assert_runtime_numbers(raw, good[i][1])
            answered += 1
        else:
            name, _, reason = bad[i]
            assert reason in _refusal(status, raw), (name, raw[:1000])
            refused += 1
    assert (answered, refused) == (len(good), len(bad))
    # alive and still right afterwards
    with urllib.request.urlopen(f"{served}/ping", timeout=30) as response:
        assert response.status == 200
    status, raw = _post(served, good[1][0])
    assert status == 200
    _assert_runtime_numbers(raw, good[1][1])
    assert rss_after - rss_before < BURST_RSS_GROWTH_MB, (rss_before, rss_after)
    print(f"server tree RSS {rss_before:.0f} MB -> {rss_after:.0f} MB over the burst")
    record("fault", f"served model: burst of {len(jobs)} concurrent requests, {len(bad)} malformed", tried=len(jobs),
           survived=answered + refused)


def test_concurrent_predict_calls_give_the_serial_numbers(runtime):
    """The predictor shares its input buffers between threads (a lock): 400 calls from 8 threads, each checked."""
    expected = runtime.predict(IMAGES).to_dict()
    calls = [((5 * i) % 59, 1 + i % 6) for i in range(400)]  # (start, count): batches 1-6, chunked and padded

    def run(call):
        start, count = call
        return call, runtime.predict(IMAGES[start:start + count]).to_dict()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, calls))
    for (start, count), got in results:
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], expected[name][start:start + count], rtol=0, atol=1e-6, err_msg=name)
    record("fault", "runtime predictor: 400 predict calls from 8 threads", tried=len(calls), survived=len(calls))


# -- 2. bad input on each surface: predictor, CLI, endpoint


def _npy(array):
    def write(folder: Path) -> Path:
        path = folder / "images.npy"
        np.save(path, array)
        return path
    return write


def _idx(count: int, rows: int = 28, cols: int = 28):
    def write(folder: Path) -> Path:
        path = folder / "images-idx3-ubyte"
        path.write_bytes(b"\x00\x00\x08\x03" + np.array([count, rows, cols], ">u4").tobytes() + bytes(count * rows * cols))
        return path
    return write


_NAN_IMAGE = np.full((2, 28, 28), 0.5, np.float32)
_NAN_IMAGE[1, 5, 5] = np.nan

#: row -> [(case, surface, input, the message it must give)]; surface: predictor (array), cli (file writer), endpoint (body)
BAD_INPUTS = {
    "inference: wrong shape": [
        ("one 27x28 image", "predictor", np.zeros((27, 28), np.uint8), r"images: shape \(27, 28\), expected \(N, 28, 28\)"),
        ("28x27 images", "predictor", np.zeros((2, 28, 27), np.uint8), r"shape \(2, 28, 27\)"),
        ("flattened", "predictor", np.zeros((3, 784), np.float32), r"shape \(3, 784\)"),
        ("three channels", "predictor", np.zeros((2, 3, 28, 28), np.float32), r"shape \(2, 3, 28, 28\)"),
        ("channels last", "predictor", np.zeros((2, 28, 28, 1), np.float32), r"shape \(2, 28, 28, 1\)"),
        (".npy 28x27", "cli", _npy(np.zeros((2, 28, 27), np.uint8)), r"images.npy: array of shape \(2, 28, 27\)"),
        ("IDX 27x28", "cli", _idx(2, 27, 28), r"images-idx3-ubyte: images of 27x28 pixels"),
        ("27x28 JSON", "endpoint", _body([np.zeros((27, 28)).tolist()]), "does not match expected shape (-1, 28, 28)"),
        ("no batch axis", "endpoint", _body(_image()), "does not match expected shape (-1, 28, 28)"),
        ("a channel axis", "endpoint", _body([[_image()]]), "does not match expected shape (-1, 28, 28)"),
    ],
    "inference: wrong dtype": [
        ("strings", "predictor", np.full((1, 28, 28), "a"), r"dtype <U1 not supported"),
        ("bool", "predictor", np.zeros((1, 28, 28), bool), r"dtype bool not supported"),
        ("complex", "predictor", np.zeros((1, 28, 28), np.complex64), r"dtype complex64 not supported"),
        ("objects", "predictor", np.full((1, 28, 28), None), r"dtype object not supported"),
        ("datetimes", "predictor", np.zeros((1, 28, 28), "datetime64[s]"), r"dtype datetime64\[s\] not supported"),
        ("ragged lists", "predictor", [[[0] * 28] * 28, [[0] * 28] * 27], r"not a rectangular array"),
        (".npy complex", "cli", _npy(np.zeros((1, 28, 28), np.complex128)), r"images.npy: dtype complex128 not supported"),
        (".npy strings", "cli", _npy(np.full((1, 28, 28), "a")), r"images.npy: dtype <U1 not supported"),
        (".npy objects", "cli", _npy(np.full((1, 28, 28), None)), r"images.npy: not a readable .npy array"),
        ("strings JSON", "endpoint", _body([[["a"] * 28] * 28]), "could not convert string to float"),
        ("an object for the batch", "endpoint", _body({"a": [_image()]}), "expects a single n-dimensional array"),
        ("a string for the batch", "endpoint", _body("abc"), "Failed to convert data `abc`"),
    ],
    "inference: NaN pixels": [
        ("NaN float32", "predictor", _NAN_IMAGE, r"images: 1 pixel value\(s\) are NaN or infinite"),
        ("inf float64", "predictor", np.where(np.eye(28, dtype=bool), np.inf, 0.5)[None], r"28 pixel value\(s\) are NaN"),
        ("-inf float16", "predictor", np.full((1, 28, 28), -np.inf, np.float16), r"784 pixel value\(s\) are NaN"),
        (".npy NaN", "cli", _npy(_NAN_IMAGE), r"images.npy: 1 pixel\(s\) are NaN or infinite"),
        ("NaN", "endpoint", _with_pixel(math.nan), "images: 1 pixel value(s) are NaN or infinite"),
        ("Infinity", "endpoint", _with_pixel(math.inf), "images: 1 pixel value(s) are NaN or infinite"),
        ("1e400", "endpoint", _with_pixel(1e400), "images: 1 pixel value(s) are NaN or infinite"),
        ("null", "endpoint", _with_pixel(None), "images: 1 pixel value(s) are NaN or infinite"),
        ("NaN as 0-255", "endpoint", json.dumps({"inputs": [[[math.nan] * 28] * 28], "params": {"pixels": "0-255"}}).encode(),
         "images: 784 pixel value(s) are NaN or infinite"),
    ],
    "inference: empty batch": [
        ("(0, 28, 28) uint8", "predictor", np.zeros((0, 28, 28), np.uint8), r"images: empty batch \(0 images\)"),
        ("(0, 1, 28, 28) float32", "predictor", np.zeros((0, 1, 28, 28), np.float32), r"images: empty batch \(0 images\)"),
        ("[]", "predictor", [], r"images: empty batch \(0 images\)"),
        (".npy of 0 images", "cli", _npy(np.zeros((0, 28, 28), np.uint8)), r"images.npy: the array holds no images"),
        ("IDX of 0 images", "cli", _idx(0), r"images-idx3-ubyte: the IDX file holds no images"),
        ("[]", "endpoint", _body([]), "Failed to enforce schema of data '[]'"),
        ("[[]]", "endpoint", _body([[]]), "Shape of input (1, 0) does not match expected shape (-1, 28, 28)"),
        ("instances []", "endpoint", json.dumps({"instances": []}).encode(), "Failed to enforce schema of data '[]'"),
    ],
}
BAD_CASES = [(row, case, surface) for row, cases in BAD_INPUTS.items() for case, surface, _, _ in cases]


def _bad_input(row: str, case: str, surface: str):
    return next((value, message) for c, s, value, message in BAD_INPUTS[row] if (c, s) == (case, surface))


@pytest.mark.parametrize(("row", "case", "surface"), [c for c in BAD_CASES if c[2] == "predictor"],
                         ids=[f"{c[0][11:]}-{c[1]}" for c in BAD_CASES if c[2] == "predictor"])
def test_the_predictor_refuses_bad_images_naming_the_problem(runtime, row, case, surface):
    value, message = _bad_input(row, case, surface)
    with pytest.raises(InputError, match=message):
        runtime.predict(value)
    record("bad_input", row, tried=1, survived=1)


@pytest.mark.parametrize(("row", "case", "surface"), [c for c in BAD_CASES if c[2] == "cli"],
                         ids=[f"{c[0][11:]}-{c[1]}" for c in BAD_CASES if c[2] == "cli"])
def test_pfp_predict_exits_1_with_one_line_naming_the_file(lenet_bundle, tmp_path, capsys, row, case, surface):
    write, message = _bad_input(row, case, surface)
    path = write(tmp_path)
    assert pfp_cli.main(["predict", str(lenet_bundle), str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfp: error: "), err
    assert re.search(message, lines[0]), lines[0]
    record("bad_input", row, tried=1, survived=1)


@pytest.mark.parametrize(("row", "case", "surface"), [c for c in BAD_CASES if c[2] == "endpoint"],
                         ids=[f"{c[0][11:]}-{c[1]}" for c in BAD_CASES if c[2] == "endpoint"])
def test_the_endpoint_answers_bad_input_with_400_and_the_reason(served, row, case, surface):
    body, reason = _bad_input(row, case, surface)
    message = _refusal(*_post(served, body))
    assert reason in message, message[:2000]
    record("bad_input", row, tried=1, survived=1)


# -- huge batches: chunked with bounded memory (predictor, CLI), refused above the stated limit (endpoint)


def test_a_huge_batch_runs_in_chunks_with_memory_of_its_output_only(runtime):
    count = 20_000
    pixels = np.resize(IMAGES, (count, 28, 28))  # the 64 digits over and over: rows repeat every 64
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        prediction = runtime.predict(pixels)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    output = prediction.probs.base.nbytes if prediction.probs.base is not None else 0
    packed = count * (3 * 10 + 2) * 4  # (N, 3 C + 2) float32: what the answer itself is
    assert output == packed
    # the packed answer, the predicted classes (int64) and the OOD flags: no copy of the input, no per-chunk parts kept
    assert peak < packed + count * (8 + 2) + (1 << 20), (peak, packed)
    small = runtime.predict(IMAGES).to_dict()
    for name in OUTPUTS:
        np.testing.assert_allclose(getattr(prediction, name)[-64:], small[name][np.arange(count - 64, count) % 64], rtol=0,
                                   atol=1e-6, err_msg=name)
    record("bad_input", "inference: huge batch", tried=1, survived=1)
    record("probe", "runtime predictor: a huge batch kept every chunk's output alive until one concatenation (2x memory)",
           tried=1, survived=1)


def test_distinct_batch_sizes_leave_no_state_behind(runtime):
    """Probe: the predictor cached a chunk plan per batch size ever seen (N/4 entries each): a server leaked memory."""
    pixels = np.resize(IMAGES, (1040, 28, 28))
    runtime.predict(pixels[:1001])  # warm
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for count in range(1002, 1041):
            runtime.predict(pixels[:count])
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert retained < 16 << 10, retained  # the old cache kept about 80 KB for these 39 sizes
    record("probe", "runtime predictor: a chunk plan cached per batch size (memory grew with every new size)", tried=1,
           survived=1)


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_an_idx_header_announcing_billions_of_images_is_a_truncated_file(lenet_bundle, tmp_path, capsys, compressed):
    """Probe: one read of the announced size raised MemoryError, a traceback from ``pfp predict``."""
    data = b"\x00\x00\x08\x03" + np.array([2**32 - 1, 28, 28], ">u4").tobytes() + bytes(2 * 784)
    path = tmp_path / ("images-idx3-ubyte.gz" if compressed else "images-idx3-ubyte")
    path.write_bytes(gzip.compress(data) if compressed else data)
    assert pfp_cli.main(["predict", str(lenet_bundle), str(path)]) == 1
    _, err = capsys.readouterr()
    assert err == (f"pfp: error: {path}: truncated: the header says 4294967295 images (3367254359280 bytes), "
                   "the file holds 1568 bytes (2 whole images)\n")
    record("probe", "pfp predict: an IDX header announcing 4 billion images raised MemoryError (a traceback)", tried=1,
           survived=1)


def test_pfp_predict_runs_a_huge_file_in_chunks(lenet_bundle, runtime, tmp_path, capsys):
    count = 5_000
    pixels = np.resize(IMAGES, (count, 28, 28))
    np.save(tmp_path / "many.npy", pixels)
    assert pfp_cli.main(["predict", str(lenet_bundle), str(tmp_path / "many.npy"), "--json"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert err == "" and len(records) == count
    expected = runtime.predict(IMAGES)
    assert [r["predicted"] for r in records[-64:]] == expected.predicted[np.arange(count - 64, count) % 64].tolist()
    np.testing.assert_allclose([r["mi"] for r in records[:64]], expected.mi, rtol=0, atol=1e-6)
    record("bad_input", "inference: huge batch", tried=1, survived=1)


def test_the_endpoint_answers_the_limit_and_refuses_one_image_more(served, runtime):
    pixels = np.resize(IMAGES, (SERVED_LIMIT + 1, 28, 28))
    message = _refusal(*_post(served, _body(pixels.tolist(), "0-255")))
    assert f"images: {SERVED_LIMIT + 1} images in one request, at most {SERVED_LIMIT}; send them in several requests" in message
    status, raw = _post(served, _body(pixels[:SERVED_LIMIT].tolist(), "0-255"))
    assert status == 200
    predictions = json.loads(raw)["predictions"]
    assert len(predictions["probs"]) == SERVED_LIMIT
    assert predictions["predicted"][:64] == runtime.predict(IMAGES).predicted.tolist()
    record("bad_input", "inference: huge batch", tried=2, survived=2)


def test_the_model_refuses_more_than_its_default_limit_and_a_bad_limit_setting(champion, monkeypatch):
    monkeypatch.delenv(MAX_IMAGES_ENV, raising=False)
    model = mlflow.pyfunc.load_model(champion)
    with pytest.raises(MlflowException, match=rf"images: {MAX_IMAGES + 1} images in one request, at most {MAX_IMAGES}") as error:
        model.predict(np.zeros((MAX_IMAGES + 1, 28, 28), np.float32))
    assert error.value.get_http_status_code() == 400
    monkeypatch.setenv(MAX_IMAGES_ENV, "lots")
    with pytest.raises(ValueError, match=rf"\${MAX_IMAGES_ENV}='lots': expected a positive whole number of images"):
        mlflow.pyfunc.load_model(champion)  # a server with this setting does not start
    record("bad_input", "inference: huge batch", tried=1, survived=1)


# -- property: any array is either predicted (valid pixels) or refused with InputError, nothing else

_DTYPES = ["uint8", "int16", "int64", "uint64", "float16", "float32", "float64", "bool", "complex64", "<U1", "datetime64[s]"]
_SHAPES = ["batch", "batch with channel", "one image", "27 rows", "flattened", "empty"]


def _shape(kind: str, n: int) -> tuple[int, ...]:
    return {"batch": (n, 28, 28), "batch with channel": (n, 1, 28, 28), "one image": (28, 28), "27 rows": (n, 27, 28),
            "flattened": (n, 784), "empty": (0, 28, 28)}[kind]


def test_any_array_is_predicted_or_refused_with_input_error(runtime):
    @st.composite
    def images(draw):
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = _shape(draw(st.sampled_from(_SHAPES)), draw(st.integers(1, 5)))
        if dtype.kind == "f":
            # mostly valid pixels, sometimes a NaN/inf or a value out of 0-1 somewhere
            elements = st.floats(0, 1, width=dtype.itemsize * 8) | st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 1.5, 255.0])
            fill = st.floats(0, 1, width=dtype.itemsize * 8)
        elif dtype.kind in "ui":
            info = np.iinfo(dtype)
            elements = st.integers(0, 255) | st.integers(int(info.min), int(info.max))
            fill = st.integers(0, 255)
        else:
            return np.zeros(shape, dtype)
        return draw(hnp.arrays(dtype, shape, elements=elements, fill=fill))

    examples = 0

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(images())
    def check(x):
        nonlocal examples
        examples += 1
        shape_ok = x.shape[1:] in ((28, 28), (1, 28, 28)) and x.shape[0] > 0 or x.shape == (28, 28)
        top = 1.0 if x.dtype.kind == "f" else 255
        valid = x.dtype.kind in "uif" and shape_ok and bool(np.isfinite(x).all() and (x >= 0).all() and (x <= top).all())
        if not valid:
            with pytest.raises(InputError):
                runtime.predict(x)
            return
        prediction = runtime.predict(x)
        n = 1 if x.shape == (28, 28) else x.shape[0]
        assert prediction.probs.shape == (n, 10) and np.isfinite(prediction.probs).all()
        np.testing.assert_allclose(prediction.probs.sum(axis=1), 1, atol=1e-5)
        assert (prediction.mi >= -1e-6).all() and (prediction.sme >= prediction.mi - 1e-5).all()

    check()
    record("property", "runtime predictor: any array predicted or refused (hypothesis)", tried=examples, survived=examples)
