"""``pfp predict``, run as a subprocess like a user runs it: output, errors and exit status, imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def environment() -> dict[str, str]:
    env = dict(os.environ, TVM_NUM_THREADS="1", PFP_RUNTIME_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment(), timeout=120)


def pfp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pfp_runtime.cli", *map(str, args)], capture_output=True, text=True,
                          env=environment(), timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    if status == 1:
        assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], result.stderr
    return lines[-1]


# -- imports


def test_cli_and_readers_import_no_torch_tvm_or_pillow():
    result = python("import sys, pfp_runtime.cli, pfp_runtime.images\n"
                    "print(sorted(m for m in ('torch', 'tvm', 'PIL', 'pfp', 'tvm_ffi') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reading_npy_and_idx_imports_no_pillow(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    result = python(f"import sys\nfrom pfp_runtime.images import read_images\n"
                    f"images = read_images([{str(tmp_path / 'x.npy')!r}])\n"
                    f"print(len(images), 'PIL' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False"]


def test_pngs_are_read_without_pillow_too(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "colour.png")
    expected = np.asarray(Image.open(tmp_path / "colour.png").convert("L"))
    np.save(tmp_path / "expected.npy", expected)
    result = python(f"import sys\nsys.modules['PIL'] = None  # as if Pillow were not installed\n"
                    f"import numpy as np\nfrom pfp_runtime.images import read_image_file\n"
                    f"got = read_image_file({str(tmp_path / 'colour.png')!r}).pixels[0]\n"
                    f"print(np.array_equal(got, np.load({str(tmp_path / 'expected.npy')!r})))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_the_pfp_script_is_installed_with_the_package():
    import tomllib

    from pfp_runtime import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pfp"] == "pfp_runtime.cli:main" and callable(cli.main)


# -- usage, and errors found before the bundle is loaded


def test_help_documents_predict():
    result = pfp("predict", "--help")
    assert result.returncode == 0
    for word in ("BUNDLE", "IMAGES", "--json", "--limit", "--threads", "idx3-ubyte", ".npy", "PNG", "28x28", "Exit status"):
        assert word in result.stdout, word
    top = pfp("--help")
    assert top.returncode == 0 and "predict" in top.stdout


@pytest.mark.parametrize("args, fragment", [
    ((), "usage: pfp"),
    (("predict",), "the following arguments are required: BUNDLE, IMAGES"),
    (("predict", "bundle"), "the following arguments are required: IMAGES"),
    (("predict", "bundle", "x.npy", "--limit", "0"), "argument --limit: expected a positive integer, got 0"),
    (("predict", "bundle", "x.npy", "--threads", "two"), "argument --threads: expected a positive integer, got 'two'"),
    (("classify", "bundle", "x.npy"), "invalid choice: 'classify'"),
])
def test_usage_errors_exit_2(args, fragment):
    result = pfp(*args)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_a_missing_image_file_is_named_before_any_bundle_is_loaded(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((1, 28, 28), np.uint8))
    line = assert_one_error_line(pfp(tmp_path / "no-bundle", tmp_path / "good.npy", tmp_path / "gone.png"), 2)
    assert "invalid choice" in line  # the subcommand is required: the first word is not a command
    line = assert_one_error_line(pfp("predict", tmp_path / "no-bundle", tmp_path / "good.npy", tmp_path / "gone.png"), 1,
                                 f"{tmp_path / 'gone.png'}: cannot read")
    assert line.startswith("pfp: error: ")


def test_a_missing_bundle_is_named(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((1, 28, 28), np.uint8))
    assert_one_error_line(pfp("predict", tmp_path / "no-bundle", tmp_path / "good.npy"), 1,
                          f"{tmp_path / 'no-bundle'}: bundle folder not found")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(pfp("predict", tmp_path / "empty", tmp_path / "good.npy"), 1,
                          f"{tmp_path / 'empty' / 'bundle.json'}: not found")


# -- on a real bundle (pfp.bundle.build_bundle of a random posterior)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.common import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "mlp-host", "mlp", batch_sizes=(1, 4)).folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Seven images in three files (IDX gz, PNG, npy floats) and the uint8 pixels they hold, in order."""
    from PIL import Image

    from pfp.data.idx import write_idx_images

    folder = tmp_path_factory.mktemp("images")
    pixels = np.random.default_rng(5).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    pixels[0] = 0  # a blank image and a bright square among the noise
    pixels[1] = 0
    pixels[1, 8:20, 10:18] = 255
    write_idx_images(folder / "t10k-images-idx3-ubyte.gz", pixels[:4])
    Image.fromarray(pixels[4]).save(folder / "digit.png")
    np.save(folder / "pair.npy", pixels[5:7].astype(np.float32) / 255)
    files = [folder / "t10k-images-idx3-ubyte.gz", folder / "digit.png", folder / "pair.npy"]
    sources = [f"{files[0]}[{i}]" for i in range(4)] + [str(files[1]), f"{files[2]}[0]", f"{files[2]}[1]"]
    return files, sources, pixels


@pytest.fixture(scope="module")
def expected(bundle, inputs):
    from pfp_runtime import load_bundle

    return load_bundle(bundle, threads=1).predict(inputs[2])


def test_table_has_one_row_per_image_with_the_predictions(bundle, inputs, expected):
    files, sources, _ = inputs
    result = pfp("predict", bundle, *files)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["source", "class", "prob", "MI", "SME", "OOD"]
    assert len(rows) == len(sources) == 7
    for i, (row, source) in enumerate(zip(rows, sources)):
        cells = row.split()
        assert cells[0] == source
        label = int(expected.predicted[i])
        assert int(cells[1]) == label
        assert float(cells[2]) == pytest.approx(float(expected.probs[i, label]), abs=5e-5)
        assert float(cells[3]) == pytest.approx(float(expected.mi[i]), abs=5e-5)
        assert float(cells[4]) == pytest.approx(float(expected.sme[i]), abs=5e-5)
        assert cells[5] == ("yes" if expected.ood[i] else "no")


def test_json_matches_the_runtime_on_the_same_images(bundle, inputs, expected):
    files, sources, _ = inputs
    result = pfp("predict", bundle, *files, "--json", "--threads", "2")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [record["source"] for record in records] == sources
    assert set(records[0]) == {"source", "predicted", "probability", "mi", "sme", "ood", "probs", "logit_mean", "logit_var"}
    for name in ("probs", "logit_mean", "logit_var", "mi", "sme"):
        got = np.array([record[name] for record in records])
        np.testing.assert_allclose(got, getattr(expected, name), rtol=0, atol=1e-6, err_msg=name)
    assert [record["predicted"] for record in records] == expected.predicted.tolist()
    assert [record["ood"] for record in records] == expected.ood.tolist()
    np.testing.assert_allclose([record["probability"] for record in records], expected.probs.max(axis=1), atol=1e-6)
    assert np.allclose(expected.probs.sum(axis=1), 1, atol=1e-5) and (expected.mi >= 0).all()


def test_limit_and_an_archived_bundle(bundle, inputs, expected, tmp_path):
    import tarfile

    files, sources, _ = inputs
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="mlp-host")
    result = pfp("predict", archive, *files, "--json", "--limit", "5")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [record["source"] for record in records] == sources[:5]
    np.testing.assert_allclose([record["mi"] for record in records], expected.mi[:5], atol=1e-6)


def test_running_a_prediction_loads_neither_torch_nor_the_tvm_package(bundle, inputs):
    files = inputs[0]
    code = (f"import contextlib, io, sys\nfrom pfp_runtime.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    status = main(['predict', {str(bundle)!r}, {str(files[0])!r}, {str(files[2])!r}])\n"
            f"print(status, sorted(m for m in ('torch', 'tvm', 'PIL', 'pfp') if m in sys.modules))")
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"


def test_bad_inputs_with_a_real_bundle_exit_1_naming_the_file(bundle, inputs, tmp_path):
    from PIL import Image

    files = inputs[0]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    assert_one_error_line(pfp("predict", bundle, files[0], tmp_path / "big.png"), 1,
                          f"{tmp_path / 'big.png'}: image of 32x32 pixels, expected 28x28")
    (tmp_path / "labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
    assert_one_error_line(pfp("predict", bundle, tmp_path / "labels-idx1-ubyte"), 1,
                          f"{tmp_path / 'labels-idx1-ubyte'}: an IDX label file")
    np.save(tmp_path / "wide.npy", np.full((2, 28, 28), 200.0))
    assert_one_error_line(pfp("predict", bundle, tmp_path / "wide.npy"), 1,
                          f"{tmp_path / 'wide.npy'}: float pixels from 200 to 200, expected 0 to 1")


def test_bad_bundles_exit_1_naming_the_file(bundle, inputs, tmp_path):
    import shutil

    files = inputs[0]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    with open(corrupt / "pfp_b4.so", "ab") as handle:
        handle.write(b"\0")
    assert_one_error_line(pfp("predict", corrupt, files[1]), 1, f"{corrupt / 'pfp_b4.so'}: checksum mismatch")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "bundle.json").write_text("{not json")
    assert_one_error_line(pfp("predict", broken, files[1]), 1, f"{broken / 'bundle.json'}: not valid JSON")
    (tmp_path / "bundle.tar.gz").write_bytes(b"not an archive")
    assert_one_error_line(pfp("predict", tmp_path / "bundle.tar.gz", files[1]), 1,
                          f"{tmp_path / 'bundle.tar.gz'}: not a readable bundle archive")


def test_a_closed_pipe_ends_quietly(bundle, tmp_path):
    from pfp.data.idx import write_idx_images

    write_idx_images(tmp_path / "many-idx3-ubyte", np.zeros((300, 28, 28), np.uint8))  # > 64 KiB of JSON
    process = subprocess.Popen([sys.executable, "-m", "pfp_runtime.cli", "predict", str(bundle), str(tmp_path / "many-idx3-ubyte"),
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    assert process.stdout.readline().strip() == b"["
    process.stdout.close()  # like `pfp predict ... | head -1`
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert stderr == ""
