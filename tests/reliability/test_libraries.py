"""Compiled libraries and bundles are checked before any of their code is mapped, and a library's files form a set.

Damaged libraries are loaded in child processes: a truncated library used to end the process
with SIGBUS (dlopen maps the missing pages), which a test in the same process could not report.
The interrupted export is a real export process killed with SIGKILL between its writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from pfp.backends.tvm import pipeline, runtime  # noqa: E402
from pfp.spec import Dense, Flatten, ModelSpec, ReLU  # noqa: E402
from pfp_runtime.bundle import CHECKSUM_FILE, METADATA_FILE, write_checksums  # noqa: E402
from tests.backends.tvm.helpers import random_params  # noqa: E402
from tests.common import make_bundle  # noqa: E402
from tests.reliability.report import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BATCH = 2
#: a small network: compiles in about a second, its library still about 100 kB
SPEC = ModelSpec(name="tiny", input_shape=(1, 28, 28),
                 layers=(Flatten(), Dense("fc1", 784, 16), ReLU(), Dense("fc2", 16, 10)))
X = np.random.default_rng(0).standard_normal((BATCH, 1, 28, 28)).astype(np.float32)


def environment() -> dict[str, str]:
    env = dict(os.environ, TVM_NUM_THREADS="1", PFP_RUNTIME_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_child(code: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env=environment(), timeout=timeout, cwd=ROOT)


def compile_tiny(seed: int = 0, *, weights_as_params: bool = False):
    return pipeline.compile_pfp(SPEC, random_params(SPEC, seed), batch_size=BATCH, weights_as_params=weights_as_params)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny model's library with its weights compiled in (``lib.so``, ``lib.so.json``) and its outputs on X."""
    compiled = compile_tiny(0)
    path = compiled.export(tmp_path_factory.mktemp("library") / "lib.so")
    return path, compiled(X)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "mlp", "mlp", batch_sizes=(1,)).folder


def copy_library(path: Path, folder: Path, name: str = "lib.so") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".json", ".weights.npz"):
        if Path(f"{path}{suffix}").is_file():
            shutil.copy(f"{path}{suffix}", folder / f"{name}{suffix}")
    return folder / name


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    value = change(value) or value
    path.write_text(json.dumps(value))


# -- damaged libraries, loaded by pfp.backends.tvm.runtime.load in a child process

_LOAD_EACH = """
    import json, sys
    from pfp.backends.tvm import runtime
    for path in sys.argv[1:]:
        print("case", path, flush=True)  # the last case printed is the one that crashed, if any
        try:
            runtime.load(path)
        except runtime.LibraryError as error:
            print(json.dumps({"path": path, "error": type(error).__name__, "message": str(error)}), flush=True)
        else:
            print(json.dumps({"path": path, "error": None}), flush=True)
"""


def _outcomes(result: subprocess.CompletedProcess) -> dict[str, dict]:
    assert result.returncode == 0, f"the loading process ended with {result.returncode} " \
                                   f"(negative: killed by a signal)\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return {item["path"]: item for item in map(json.loads, (line for line in result.stdout.splitlines()
                                                           if line.startswith("{")))}


def test_damaged_libraries_are_refused_naming_the_file_never_a_crash(library, tmp_path):
    path, _ = library
    size = path.stat().st_size
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, expected: str, damage) -> None:
        copy = copy_library(path, tmp_path / name)
        damage(copy)
        cases[name] = (copy, expected)

    case("truncated to half", "but lib.so.json says", lambda p: os.truncate(p, size // 2))
    # only the section header table cut off: this one used to load and run (its metadata could not tell)
    case("truncated by 100 bytes", "but lib.so.json says", lambda p: os.truncate(p, size - 100))
    case("empty", "an empty file, but lib.so.json says", lambda p: p.write_bytes(b""))
    case("a text file", "but lib.so.json says", lambda p: p.write_text("this is not a library\n"))
    case("one byte changed", "checksum mismatch", lambda p: p.write_bytes(
        (lambda b: b[:size // 3] + bytes([b[size // 3] ^ 0xFF]) + b[size // 3 + 1:])(p.read_bytes())))
    case("metadata missing", "metadata of the compiled library not found", lambda p: Path(f"{p}.json").unlink())

    # the metadata re-recorded to match the damage: the ELF check alone stands between the file and SIGBUS
    def truncated_and_recorded(p: Path) -> None:
        os.truncate(p, size // 2)
        edit_json(Path(f"{p}.json"), lambda m: m.update(files={"library": runtime.library_record(p)}))

    case("truncated, metadata re-recorded", "truncated: its section header table ends at byte", truncated_and_recorded)

    def text_and_recorded(p: Path) -> None:
        p.write_text("this is not a library\n")
        edit_json(Path(f"{p}.json"), lambda m: m.update(files={"library": runtime.library_record(p)}))

    case("text file, metadata re-recorded", "not a compiled library (not an ELF file", text_and_recorded)

    outcomes = _outcomes(run_child(_LOAD_EACH, *(copy for copy, _ in cases.values())))
    for name, (copy, expected) in cases.items():
        outcome = outcomes[str(copy)]
        assert outcome["error"] in ("LibraryError", "LibraryNotFoundError"), (name, outcome)
        assert str(copy) in outcome["message"] and expected in outcome["message"], (name, outcome["message"])
    for name in cases:
        record("probe", f"compiled library {name}: refused before loading (was SIGBUS or a TVM traceback)",
               tried=1, survived=1)


def test_a_damaged_library_ends_a_stage_with_one_line_and_exit_2(library, tmp_path):
    """The stages run through pfp.stage.run_stage: a refused library is a DataError, so no traceback."""
    path, _ = library
    copy = copy_library(path, tmp_path)
    os.truncate(copy, copy.stat().st_size // 2)
    result = run_child("""
        import sys
        from pfp.backends.tvm import runtime
        from pfp.stage import run_stage
        run_stage(lambda params, argv: runtime.load(sys.argv[1]))
    """, copy)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {copy}: ") and "Traceback" not in result.stderr, result.stderr
    record("bad_input", "libraries: truncated library loaded by a stage (one line, exit 2)", tried=1, survived=1)


# -- damaged bundles, loaded by the torch-free runtime and by `pfp predict`

def _damaged_bundles(bundle: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    library = "pfp_b1.so"
    size = (bundle / library).stat().st_size
    cases = {}

    def case(name: str, expected: str, damage, *, rechecksum: bool) -> None:
        copy = shutil.copytree(bundle, tmp_path / name.replace(" ", "_"))
        damage(copy)
        if rechecksum:
            write_checksums(copy)
        cases[name] = (copy, expected.format(copy=copy))

    case("library truncated", "{copy}/pfp_b1.so: checksum mismatch",
         lambda f: os.truncate(f / library, size // 2), rechecksum=False)
    # SHA256SUMS re-made after the damage (as a careless copy or a rebuild of the sums would): SIGBUS before
    case("library truncated, checksums re-made", "{copy}/pfp_b1.so: truncated",
         lambda f: os.truncate(f / library, size // 2), rechecksum=True)
    case("library truncated by 100 bytes, checksums re-made", "{copy}/pfp_b1.so: truncated",
         lambda f: os.truncate(f / library, size - 100), rechecksum=True)
    case("library empty, checksums re-made", "{copy}/pfp_b1.so: empty file",
         lambda f: (f / library).write_bytes(b""), rechecksum=True)
    case("library a text file, checksums re-made", "{copy}/pfp_b1.so: not a compiled library",
         lambda f: (f / library).write_text("not a library\n"), rechecksum=True)
    case("library one byte changed", "{copy}/pfp_b1.so: checksum mismatch",
         lambda f: (f / library).write_bytes((lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:])((f / library).read_bytes())),
         rechecksum=False)
    case("bundle.json missing", "{copy}/bundle.json: not found", lambda f: (f / METADATA_FILE).unlink(), rechecksum=False)
    case("SHA256SUMS missing", "{copy}/SHA256SUMS: checksum file missing", lambda f: (f / CHECKSUM_FILE).unlink(),
         rechecksum=False)
    return cases


_LOAD_BUNDLES = """
    import json, sys
    from pfp_runtime import BundleError, load_bundle
    for path in sys.argv[1:]:
        print("case", path, flush=True)
        try:
            load_bundle(path)
        except BundleError as error:
            print(json.dumps({"path": path, "error": type(error).__name__, "message": str(error)}), flush=True)
        else:
            print(json.dumps({"path": path, "error": None}), flush=True)
"""


def test_damaged_bundles_are_refused_by_the_runtime_and_the_cli(bundle, tmp_path):
    cases = _damaged_bundles(bundle, tmp_path)
    outcomes = _outcomes(run_child(_LOAD_BUNDLES, *(folder for folder, _ in cases.values())))
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 28, 28), np.uint8))
    for name, (folder, expected) in cases.items():
        outcome = outcomes[str(folder)]
        assert outcome["error"] == "BundleError" and expected in outcome["message"], (name, outcome)
        # the command a user runs: exit status 1, one line naming the file, nothing on stdout
        result = subprocess.run([sys.executable, "-m", "pfp_runtime.cli", "predict", str(folder), str(images)],
                                capture_output=True, text=True, env=environment(), timeout=120)
        assert result.returncode == 1, (name, result.returncode, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, (name, result.stderr)
    for name in cases:
        if "truncated" in name and "re-made" in name:
            record("probe", f"bundle {name}: refused before loading (was SIGBUS)", tried=1, survived=1)
    damaged = [name for name in cases if not ("truncated" in name and "re-made" in name)]
    record("bad_input", "bundles: damaged files (truncated, changed, empty, text, missing): `pfp predict` exits 1",
           tried=len(damaged), survived=len(damaged))


# -- the library's files as a set: a real export killed between its writes

_EXPORT_AND_PAUSE = """
    import os, sys, time
    from pathlib import Path
    from pfp.backends.tvm import pipeline, runtime
    from pfp.spec import ModelSpec
    from tests.backends.tvm.helpers import random_params
    path, seed, weights_as_params, pause_at, marker, spec, batch = sys.argv[1:]
    SPEC, BATCH = ModelSpec.from_json(spec), int(batch)

    def pausing(write):
        def wrapper(*args, **kwargs):
            if pause_at == "link":  # the library linked into its temp file, not yet renamed into place
                write(*args, **kwargs)
            Path(marker).write_text(str(os.getpid()))
            time.sleep(120)  # killed here
            return write(*args, **kwargs)
        return wrapper

    compiled = pipeline.compile_pfp(SPEC, random_params(SPEC, int(seed)), batch_size=BATCH,
                                    weights_as_params=weights_as_params == "1")
    if pause_at == "link":
        type(compiled.module).export_library = pausing(type(compiled.module).export_library)
    elif pause_at == "weights":
        runtime.atomic_savez = pausing(runtime.atomic_savez)
    else:
        runtime.atomic_write_json = pausing(runtime.atomic_write_json)
    compiled.export(path)
"""


def _kill_when_paused(code: str, *args, marker: Path, what: str) -> None:
    """Run ``code`` (with ``args``) in a child that writes ``marker`` and sleeps where it should be killed; SIGKILL it there."""
    assert not marker.exists()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                             env=environment(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"the child did not reach {what!r} (exit {child.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _kill_export_at(path: Path, pause_at: str, *, seed: int, weights_as_params: bool, tmp_path: Path) -> None:
    """Start an export of another model to ``path``, SIGKILL it when it reaches ``pause_at``."""
    marker = tmp_path / f"paused-{pause_at}-{path.parent.name}"
    _kill_when_paused(_EXPORT_AND_PAUSE, path, seed, "1" if weights_as_params else "0", pause_at, marker, SPEC.to_json(),
                      BATCH, marker=marker, what=pause_at)


def test_an_export_killed_between_its_writes_never_leaves_a_loadable_mismatched_set(tmp_path):
    scenarios = 0
    # 1. weights compiled in: killed after the new library replaced the old, before its metadata
    old = compile_tiny(0)
    path = old.export(tmp_path / "a" / "lib.so")
    before = runtime.library_record(path)
    _kill_export_at(path, "metadata", seed=1, weights_as_params=False, tmp_path=tmp_path)
    assert runtime.library_record(path) != before, "the kill came before the new library was in place"
    with pytest.raises(runtime.LibraryError, match=f"{path}: checksum mismatch .*lib.so.json says .*interrupted export"):
        runtime.load(path)
    scenarios += 1

    # 2. weights as parameters: the new library and weights in place, the old metadata
    old_params = compile_tiny(0, weights_as_params=True)
    path = old_params.export(tmp_path / "b" / "lib.so")
    weights_before = runtime.library_record(f"{path}.weights.npz")
    _kill_export_at(path, "metadata", seed=1, weights_as_params=True, tmp_path=tmp_path)
    assert runtime.library_record(f"{path}.weights.npz") != weights_before
    with pytest.raises(runtime.LibraryError, match="lib.so(.weights.npz)?: .*(checksum|differs).*interrupted export"):
        runtime.load(path)
    scenarios += 1

    # 3. killed while linking: the previous set stays in place, whole, and loads with its own outputs
    path = old.export(tmp_path / "c" / "lib.so")
    _kill_export_at(path, "link", seed=1, weights_as_params=False, tmp_path=tmp_path)
    assert list(path.parent.glob(".lib.so.*.tmp*")), "expected the killed export's temp file"
    for got, want in zip(runtime.load(path)(X), old(X)):
        np.testing.assert_array_equal(got, want)
    scenarios += 1

    # 4. the next export cleans the killed one's temp files, and its set loads, in this process too (which
    # loaded the previous library from the same path: the dynamic loader used to hand back its old code)
    new = compile_tiny(1)
    new.export(path)
    assert not list(path.parent.glob(".lib.so.*")), list(path.parent.iterdir())
    for got, want in zip(runtime.load(path)(X), new(X)):
        np.testing.assert_array_equal(got, want)
    record("probe", "library re-exported in place, loaded again by the same process: ran the old code",
           tried=1, survived=1)

    record("fault", "library export SIGKILLed between its file writes (new library beside old metadata refused; "
           "killed mid-link: old set intact)", tried=scenarios, survived=scenarios)
    record("probe", "library files (.so, weights, metadata) not written as a set: torn set refused, not loaded",
           tried=1, survived=1)


_BUILD_AND_PAUSE = """
    import os, sys, time
    from pathlib import Path
    import pfp.bundle
    from tests.common import make_bundle
    folder, marker = sys.argv[1:]

    def pausing(work):  # every library compiled and the metadata written: only the checksums and the swap left
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)  # killed here

    pfp.bundle.write_checksums = pausing
    make_bundle(Path(folder), "mlp", batch_sizes=(1,), seed=5)
"""


def test_a_bundle_build_killed_leaves_the_old_bundle_and_the_next_build_replaces_it_whole(tmp_path, bundle):
    from pfp_runtime import load_bundle

    images = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    folder = shutil.copytree(bundle, tmp_path / "mlp")
    before = load_bundle(folder).predict(images)
    _kill_when_paused(_BUILD_AND_PAUSE, folder, tmp_path / "paused", marker=tmp_path / "paused", what="checksums")
    assert [p.name.startswith(".mlp.") for p in tmp_path.iterdir() if p.is_dir() and p != folder] == [True]
    np.testing.assert_array_equal(load_bundle(folder).predict(images).logit_mean, before.logit_mean)  # old one, whole

    # the next build: its killed predecessor's temp folder removed, the new bundle swapped in (RENAME_EXCHANGE)
    make_bundle(folder, "mlp", batch_sizes=(1,), seed=5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mlp"]
    # loaded again by this process, from the same path: the new libraries' code (the dynamic loader used to
    # hand back the old library loaded from that path)
    after = load_bundle(folder).predict(images)
    expected = load_bundle(shutil.copytree(folder, tmp_path / "copy")).predict(images)
    np.testing.assert_array_equal(after.logit_mean, expected.logit_mean)
    assert not np.allclose(after.logit_mean, before.logit_mean)
    record("fault", "bundle build SIGKILLed before its swap: old bundle intact, temp folder cleaned by the next build",
           tried=1, survived=1)
    record("probe", "bundle rebuilt in place, loaded again by the same process: ran the old code",
           tried=1, survived=1)
