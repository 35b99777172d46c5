"""Bad model files: posteriors, PFP parameters, compiled libraries and bundles, each refused with the file and key named.

Every case is a real file on disk, damaged the way a bug, a crash or a user's mistake would; the
reader must refuse it (an error naming the file and the key or field), the stage or the ``pfp``
command must exit non-zero with one line and write nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pfp.artifacts.pfp_params import load_pfp_params, save_pfp_params
from pfp.artifacts.posterior import SPEC_KEY, ParameterFileError, load_posterior, save_posterior
from pfp.convert import convert_posterior
from pfp_runtime import BundleError, load_bundle
from pfp_runtime.bundle import METADATA_FILE, write_checksums
from tests.common import make_bundle, random_posterior, refusal
from tests.reliability.report import record

ROOT = Path(__file__).resolve().parents[2]


def environment() -> dict[str, str]:
    env = dict(os.environ, TVM_NUM_THREADS="1", PFP_RUNTIME_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def rewrite_npz(source: Path, target: Path, change) -> Path:
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(target, **arrays)
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid MLP posterior and the PFP parameters converted from it, and a LeNet pair."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for model in ("mlp", "lenet"):
        posterior = random_posterior(model)
        paths[f"{model}/posterior"] = folder / f"{model}-posterior.npz"
        save_posterior(posterior, paths[f"{model}/posterior"])
        paths[f"{model}/pfp"] = folder / f"{model}-pfp.npz"
        save_pfp_params(convert_posterior(posterior), paths[f"{model}/pfp"], parent=paths[f"{model}/posterior"])
    return paths


def _set(key: str, edit):
    def change(arrays):
        arrays[key] = edit(arrays[key].copy())
    return change


def _put(index, value):
    def edit(array):
        array.flat[index] = value
        return array
    return edit


POSTERIOR_VALUES = {
    "NaN in a loc": ("fc1_weight.loc", _set("fc1_weight.loc", _put(7, np.nan)), "NaN or infinite"),
    "+Inf in a loc": ("fc2_bias.loc", _set("fc2_bias.loc", _put(0, np.inf)), "NaN or infinite"),
    "-Inf in a scale": ("fc3_weight.scale", _set("fc3_weight.scale", _put(3, -np.inf)), "NaN or infinite"),
    "NaN in a scale": ("fc1_bias.scale", _set("fc1_bias.scale", _put(1, np.nan)), "NaN or infinite"),
    "negative scale": ("fc2_weight.scale", _set("fc2_weight.scale", _put(11, -0.01)), "non-positive"),
    "zero scale": ("fc3_bias.scale", _set("fc3_bias.scale", _put(2, 0.0)), "non-positive"),
    "loc of the wrong shape": ("fc1_weight.loc", _set("fc1_weight.loc", lambda a: a[:, :-1]), "spec says (100, 784)"),
    "scale transposed": ("fc2_weight.scale", _set("fc2_weight.scale", lambda a: a.T.copy()[:50]), "spec says (100, 100)"),
    "a site missing": ("fc3_bias.scale", lambda arrays: arrays.pop("fc3_bias.scale"), "missing array 'fc3_bias.scale'"),
}

PFP_VALUES = {
    "NaN in a weight mean": ("fc1.weight_mean", _set("fc1.weight_mean", _put(5, np.nan)), "NaN or infinite"),
    "Inf in a weight variance": ("fc2.weight_var", _set("fc2.weight_var", _put(5, np.inf)), "NaN or infinite"),
    "negative weight variance": ("fc2.weight_var", _set("fc2.weight_var", _put(5, -1e-3)), "negative values"),
    "negative bias variance": ("fc3.bias_var", _set("fc3.bias_var", _put(0, -1e-3)), "negative values"),
    "E[w^2] inconsistent with mean and variance": ("fc1.weight_m2", _set("fc1.weight_m2", lambda a: a * 2),
                                                   "is not weight_var + weight_mean^2"),
    "bias of the wrong shape": ("fc3.bias_mean", _set("fc3.bias_mean", lambda a: a[:9]), "spec says (10,)"),
    "a field missing": ("fc2.weight_m2", lambda arrays: arrays.pop("fc2.weight_m2"), "missing array 'fc2.weight_m2'"),
    "covariance layers out of range": ("covariance_layers", _set("covariance_layers", lambda a: np.array(99)),
                                       "covariance_layers"),
    "covariance layers not a number": ("covariance_layers", _set("covariance_layers", lambda a: np.array("two")),
                                       "covariance_layers"),
}


def test_posteriors_and_pfp_parameters_with_bad_values_are_refused_naming_the_key(files, tmp_path):
    for kind, cases, loader in (("posterior", POSTERIOR_VALUES, load_posterior), ("pfp", PFP_VALUES, load_pfp_params)):
        for index, (name, (key, change, problem)) in enumerate(cases.items()):
            path = rewrite_npz(files[f"mlp/{kind}"], tmp_path / f"{kind}-{index}.npz", change)
            message = refusal(ParameterFileError, lambda loader=loader, path=path: loader(path, "mlp"), str(path), problem)
            assert key.split(".")[0] in message or key in message, (name, message)
    record("bad_input", "models: posteriors with NaN, Inf, non-positive scales, wrong shapes, missing sites",
           tried=len(POSTERIOR_VALUES), survived=len(POSTERIOR_VALUES))
    record("bad_input", "models: PFP parameters with NaN, Inf, negative variances, inconsistent E[w^2], wrong shapes",
           tried=len(PFP_VALUES), survived=len(PFP_VALUES))


def _spec_manglings(good: dict) -> dict[str, tuple[object, str]]:
    """Model descriptions (the ``spec`` entry) mangled: name -> (new entry, the problem the message names)."""
    def layer(index, **change):
        layers = copy.deepcopy(good["layers"])
        layers[index].update(change)
        return {**good, "layers": layers}

    dense = next(i for i, entry in enumerate(good["layers"]) if entry["kind"] == "dense")
    return {
        "not JSON": ("{", "not valid JSON"),
        "a JSON list": ([], "must be a JSON object, got list"),
        "a JSON string": ("mlp", "must be a JSON object, got str"),
        "no layers": ({k: v for k, v in good.items() if k != "layers"}, "missing key(s) layers"),
        "layers not a list": ({**good, "layers": "dense"}, "layers must be a non-empty list"),
        "no layer at all": ({**good, "layers": []}, "layers must be a non-empty list"),
        "a layer that is a string": ({**good, "layers": ["dense", *good["layers"][1:]]}, "layers[0] must be an object"),
        "an unknown layer kind": (layer(0, kind="attention"), "layers[0].kind: unknown layer kind 'attention'"),
        "a size as a string": (layer(dense, in_features="784"), f"layers[{dense}].in_features must be a positive integer"),
        "a negative size": (layer(dense, out_features=-5), f"layers[{dense}].out_features must be a positive integer"),
        "a size as a float": (layer(dense, out_features=100.0), f"layers[{dense}].out_features must be a positive integer"),
        "an unknown layer field": (layer(dense, dropout=0.5), "unexpected keyword argument 'dropout'"),
        "layers that do not fit together": (layer(dense, in_features=100), "expects (100,), gets (784,)"),
        "input_shape a number": ({**good, "input_shape": 784}, "input_shape must be 3 positive integers"),
        "input_shape of two numbers": ({**good, "input_shape": [28, 28]}, "input_shape must be 3 positive integers"),
        "name not a string": ({**good, "name": 5}, "name must be the model's name"),
        "no spec entry": (None, "no model description (entry 'spec')"),
        "spec entry a number array": (np.arange(3), "not a JSON text"),
    }


def test_a_mangled_model_description_inside_an_artifact_is_refused_naming_the_key(files, tmp_path):
    """Probe: a badly structured spec inside posterior.npz / pfp.npz ended in a TypeError or AttributeError traceback."""
    tried = 0
    for kind, loader in (("posterior", load_posterior), ("pfp", load_pfp_params)):
        with np.load(files[f"mlp/{kind}"]) as archive:
            good = json.loads(str(archive[SPEC_KEY]))
        for name, (entry, problem) in _spec_manglings(good).items():
            def change(arrays, entry=entry, raw=name == "not JSON"):
                if entry is None:
                    arrays.pop(SPEC_KEY)
                elif isinstance(entry, np.ndarray):
                    arrays[SPEC_KEY] = entry
                else:
                    arrays[SPEC_KEY] = np.array(entry if raw else json.dumps(entry))
            path = rewrite_npz(files[f"mlp/{kind}"], tmp_path / f"{kind}-spec-{tried}.npz", change)
            message = refusal(ParameterFileError, lambda loader=loader, path=path: loader(path, "mlp"), str(path), problem)
            assert "entry 'spec'" in message, (name, message)
            tried += 1
    record("probe", "model description (spec) inside posterior.npz / pfp.npz mangled: refused naming the key "
           "(was a traceback)", tried=tried, survived=tried)


def test_files_of_the_other_architecture_are_refused(files, tmp_path):
    cases = [
        (lambda: load_posterior(files["lenet/posterior"], "mlp"), "posterior file of model 'lenet', expected 'mlp'"),
        (lambda: load_posterior(files["mlp/posterior"], "lenet"), "posterior file of model 'mlp', expected 'lenet'"),
        (lambda: load_pfp_params(files["lenet/pfp"], "mlp"), "PFP parameter file of model 'lenet', expected 'mlp'"),
        (lambda: load_pfp_params(files["mlp/pfp"], "lenet"), "PFP parameter file of model 'mlp', expected 'lenet'"),
        # the MLP's PFP parameters given as converted from the LeNet posterior: stale
        (lambda: load_pfp_params(files["mlp/pfp"], "mlp", parent=files["lenet/posterior"]), "stale"),
    ]
    for call, problem in cases:
        refusal(ParameterFileError, call, problem)
    record("bad_input", "models: posterior / PFP file of the other architecture (or converted from another posterior)",
           tried=len(cases), survived=len(cases))


def test_a_convert_stage_given_a_bad_posterior_exits_2_with_one_line_and_writes_nothing(files, tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "models" / "mlp").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", workspace / "params.yaml")
    cases = {"NaN in a loc": POSTERIOR_VALUES["NaN in a loc"][1],
             "a mangled spec": lambda arrays: arrays.update({SPEC_KEY: np.array('{"name": "mlp", "layers": 5}')})}
    code = textwrap.dedent("""
        import sys
        from pfp.stage import run_stage
        from pfp.stages.convert import convert
        run_stage(lambda params, argv: convert("mlp", params.convert))
    """)
    for name, change in cases.items():
        rewrite_npz(files["mlp/posterior"], workspace / "models" / "mlp" / "posterior.npz", change)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment(),
                                cwd=workspace, timeout=180)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "models/mlp/posterior.npz" in lines[0] and "Traceback" not in result.stderr, lines
        assert sorted(p.name for p in (workspace / "models" / "mlp").iterdir()) == ["posterior.npz"]  # no pfp.npz
    record("bad_input", "models: bad posterior given to the convert stage (exit 2, one line, no pfp.npz)",
           tried=len(cases), survived=len(cases))


# -- compiled libraries: metadata mangled, another architecture, CPU or board

@pytest.fixture(scope="module")
def library(tmp_path_factory):
    pytest.importorskip("tvm")
    from pfp.backends.tvm import pipeline
    from pfp.spec import Dense, Flatten, ModelSpec
    from tests.backends.tvm.helpers import random_params

    spec = ModelSpec(name="mlp", input_shape=(1, 28, 28), layers=(Flatten(), Dense("fc1", 784, 10)))
    folder = tmp_path_factory.mktemp("libraries")
    host = pipeline.compile_pfp(spec, random_params(spec), batch_size=1, weights_as_params=True)
    board = pipeline.compile_pfp(spec, random_params(spec), batch_size=1, target="rasp4b")
    return host.export(folder / "host.so"), board.export(folder / "board.so")


def _library_copy(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for suffix in ("", ".json", ".weights.npz"):
        if Path(f"{path}{suffix}").is_file():
            shutil.copy(f"{path}{suffix}", folder / f"{path.name}{suffix}")
    return folder / path.name


def _metadata_manglings(good: dict) -> dict[str, tuple[object, str]]:
    def with_(**change):
        return {**copy.deepcopy(good), **change}

    return {
        "not JSON": ("{", "not readable library metadata"),
        "a JSON list": ([good], "must be a JSON object, got list"),
        "format 2 (no checksums)": (with_(format=2), "written before libraries recorded their checksums"),
        "format unknown": (with_(format="three"), "metadata format 'three'"),
        "kind unknown": (with_(kind="bnn"), "unknown compiled model kind 'bnn'"),
        "model a number": (with_(model=3), "model must be a model name"),
        "input_shape short": (with_(input_shape=[1, 28, 28]), "input_shape must be 4 positive integers"),
        "target not JSON": (with_(target="llvm -mcpu=znver5"), "target must be a TVM target"),
        "cpu_features a string": (with_(cpu_features="avx2"), "cpu_features must be a list of names"),
        "weights a string": (with_(weights="fc1_weight_mean"), "weights must be a list of names"),
        "files missing": ({k: v for k, v in good.items() if k != "files"}, "missing field(s) files"),
        "library record without its sha256": (with_(files={**good["files"], "library": {"size": 5}}),
                                               "files.library must record the file's size and sha256"),
        "weights record missing": (with_(files={"library": good["files"]["library"]}),
                                   "files.weights must record the file's size and sha256"),
        "a weight name the weights file lacks": (with_(weights=[*good["weights"], "fc9_weight_mean"]),
                                                 "missing weight(s) fc9_weight_mean"),
        "info a list": (with_(info=[1]), "info must be an object"),
    }


_LOAD_EACH = """
    import json, sys
    from pfp.backends.tvm import runtime
    expected = sys.argv[1] or None
    for path in sys.argv[2:]:
        print("case", path, flush=True)
        try:
            runtime.load(path, expected_model=expected)
        except runtime.LibraryError as error:
            print(json.dumps({"path": path, "error": type(error).__name__, "message": str(error)}), flush=True)
        else:
            print(json.dumps({"path": path, "error": None}), flush=True)
"""


def _load_in_child(paths: list[Path], expected_model: str = "") -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOAD_EACH), expected_model, *map(str, paths)],
                            capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=180)
    assert result.returncode == 0, f"ended with {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return {item["path"]: item for item in map(json.loads, (line for line in result.stdout.splitlines()
                                                           if line.startswith("{")))}


def test_libraries_with_mangled_metadata_or_for_another_machine_are_refused(library, tmp_path):
    host, board = library
    good = json.loads(Path(f"{host}.json").read_text())
    mangled, machines = {}, {}
    for index, (name, (value, problem)) in enumerate(_metadata_manglings(good).items()):
        path = _library_copy(host, tmp_path / f"meta{index}")
        Path(f"{path}.json").write_text(value if isinstance(value, str) else json.dumps(value))
        mangled[name] = (path, f"{path}.json" if "weight name" not in name else f"{path}.weights.npz", problem)

    def machine(name, source, edit, problem, named=None):
        path = _library_copy(source, tmp_path / f"machine{len(machines)}")
        meta = Path(f"{path}.json")
        value = json.loads(meta.read_text())
        edit(value, path)
        meta.write_text(json.dumps(value))
        machines[name] = (path, named or str(path), problem)

    machine("a library for the Raspberry Pi (aarch64)", board, lambda m, p: None, "was compiled for aarch64")
    # its metadata claims the host: the ELF header still tells
    machine("an aarch64 library whose metadata claims this host", board,
            lambda m, p: m.update(target=good["target"], cpu_features=[]), "a library for aarch64, not x86_64")
    machine("a library needing a CPU feature this host lacks", host,
            lambda m, p: m.update(cpu_features=[*m["cpu_features"], "avx1024_nowhere"]),
            "CPU features this host lacks: avx1024_nowhere")
    machine("a library of another model", host, lambda m, p: m.update(model="lenet"), "not the 'mlp' model asked for")
    machine("weights from another export", host, lambda m, p: m["files"]["weights"].update(sha256="0" * 64),
            "size or checksum differs", named=None)

    outcomes = _load_in_child([path for path, _, _ in (*mangled.values(), *machines.values())], expected_model="mlp")
    for name, (path, named, problem) in {**mangled, **machines}.items():
        outcome = outcomes[str(path)]
        assert outcome["error"] is not None and problem in outcome["message"], (name, outcome)
        assert outcome["message"].startswith(str(path)), (name, outcome["message"])
        assert named in outcome["message"], (name, outcome["message"])
    record("probe", "compiled library metadata mangled: refused naming the file and key (was a KeyError / "
           "TypeError / JSON traceback)", tried=len(mangled), survived=len(mangled))
    record("bad_input", "libraries: for another board, CPU features the host lacks, another model, other weights",
           tried=len(machines), survived=len(machines))


# -- bundles: metadata that does not describe its libraries, another board

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("tvm")
    return make_bundle(tmp_path_factory.mktemp("bundle") / "mlp", "mlp", batch_sizes=(1,)).folder


def _bundle_manglings() -> dict[str, tuple[object, str]]:
    def at(section, **change):
        return lambda m: m[section].update(change)

    return {
        "classes not those of the library": (lambda m: m.update(classes=5), "its output is (1, 32), but bundle.json"),
        "more classes than the library": (lambda m: m.update(classes=11), "its output is (1, 32), but bundle.json"),
        "a library listed under another batch size": (lambda m: m.update(libraries={"4": "pfp_b1.so"}),
                                                      "does not run as bundle.json describes it (batch size 4"),
        "an input shape the library does not take": (at("input", shape=[1, 14, 14]), "does not run as bundle.json"),
        "model a number": (lambda m: m.update(model=5), "model must be the model's name"),
        "spec mangled": (lambda m: m.update(spec="mlp"), "spec must describe the 'mlp' model"),
        "cpu_features a string": (at("target", cpu_features="avx2"), "target.cpu_features must be a list"),
        "architecture missing": (at("target", arch=None), "target must record the architecture"),
        "temperature infinite": (at("calibration", temperature=float("inf")), "calibration.temperature must be a positive"),
        "std a string": (at("input", std="0.3"), "input.std must be a positive number"),
        "threshold NaN": (at("ood", threshold=float("nan")), "ood.threshold must be a number"),
        "a library name that is the metadata": (lambda m: m.update(libraries={"1": METADATA_FILE}),
                                                "bundle.json: not a compiled library"),
    }


def test_bundles_with_mangled_metadata_are_refused_by_pfp_predict(bundle, tmp_path):
    """Probe: metadata that passed the field checks but did not fit the libraries gave wrong columns silently
    (classes) or a TVM traceback at the first request (batch size, input shape)."""
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 28, 28), np.uint8))
    cases = _bundle_manglings()
    for index, (name, (change, problem)) in enumerate(cases.items()):
        folder = shutil.copytree(bundle, tmp_path / f"bundle{index}")
        meta = json.loads((folder / METADATA_FILE).read_text())
        change(meta)
        (folder / METADATA_FILE).write_text(json.dumps(meta))
        write_checksums(folder)  # a consistent-looking bundle: the checks behind the checksums are tried
        with pytest.raises(BundleError, match=None) as info:
            load_bundle(folder)
        assert str(folder) in str(info.value) and problem in str(info.value), (name, str(info.value))
        if index < 4:  # the ones that reach the libraries, through the command as a user runs it
            result = subprocess.run([sys.executable, "-m", "pfp_runtime.cli", "predict", str(folder), str(images)],
                                    capture_output=True, text=True, env=environment(), timeout=120)
            assert result.returncode == 1 and result.stdout == "", (name, result.stderr)
            assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    record("probe", "bundle metadata that does not fit its libraries (classes, batch size, input shape): refused "
           "at load (was wrong columns or a traceback per request)", tried=4, survived=4)
    record("bad_input", "bundles: metadata fields mangled (types, non-finite numbers, names)",
           tried=len(cases) - 4, survived=len(cases) - 4)


def test_bundles_for_another_board_cpu_or_architecture_are_refused(bundle, tmp_path):
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((1, 28, 28), np.uint8))
    board = make_bundle(tmp_path / "board", "mlp", target="rasp4b", batch_sizes=(1,)).folder
    lacking = shutil.copytree(bundle, tmp_path / "lacking")
    meta = json.loads((lacking / METADATA_FILE).read_text())
    meta["target"]["cpu_features"].append("avx1024_nowhere")
    (lacking / METADATA_FILE).write_text(json.dumps(meta))
    write_checksums(lacking)
    liar = shutil.copytree(board, tmp_path / "liar")  # an aarch64 bundle whose metadata claims this host
    meta = json.loads((liar / METADATA_FILE).read_text())
    meta["target"].update(arch="x86_64", cpu_features=[])
    (liar / METADATA_FILE).write_text(json.dumps(meta))
    write_checksums(liar)
    cases = [(board, [], "bundle built for aarch64 (rasp4b), this host is x86_64"),
             (lacking, [], "compiled for CPU features this host lacks: avx1024_nowhere"),
             (liar, [], "pfp_b1.so: a library for aarch64, but bundle.json says target.arch x86_64"),
             (bundle, ["lenet"], "bundle of the 'mlp' model, not the 'lenet' model asked for")]
    for folder, expected, problem in cases:
        with pytest.raises(BundleError) as info:
            load_bundle(folder, expected_model=expected[0] if expected else None)
        assert problem in str(info.value), str(info.value)
        if not expected:
            result = subprocess.run([sys.executable, "-m", "pfp_runtime.cli", "predict", str(folder), str(images)],
                                    capture_output=True, text=True, env=environment(), timeout=120)
            assert result.returncode == 1 and result.stdout == "" and problem in result.stderr, result.stderr
    record("bad_input", "bundles: for another board, CPU or model (`pfp predict` exits 1)",
           tried=len(cases), survived=len(cases))
