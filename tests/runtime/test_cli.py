"""``pfp predict``, run as a subprocess like a user runs it: output, errors and exit status, imports."""

from __future__ import annotations

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
