"""Bad params: hypothesis over params.yaml, driven by the schema itself (pfp.config.PipelineParams).

Every invalid file (wrong type, out-of-range number, unknown key, wrong nesting) is refused with a
ConfigError naming the key; every valid one is accepted and read back as written. Then the probes:
each defect found, fixed in src/ and tested here (NaN learning rates, seeds numpy/torch cannot take,
an empty model list, a params file that is not UTF-8, a one-model benchmark stage under DVC).
"""

from __future__ import annotations

import enum
import json
import math
import os
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pfp.config import ConfigError, PipelineParams, TrainConfig, load_params
from tests.reliability.report import record

REPO = Path(__file__).resolve().parents[2]
MODELS = ("mlp", "lenet")
BASE = {"models": list(MODELS), "train": {"mlp": {}, "lenet": {}}}  # the smallest valid file
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])



# ------------------------------------------------------------------------------------------ the schema


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    annotation: Any
    metadata: tuple

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _walk(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, prefix + (name,))
        elif (model, name) == (PipelineParams, "train"):
            for arch in MODELS:
                yield from _walk(TrainConfig, ("train", arch))
        else:
            yield Leaf(prefix + (name,), annotation, tuple(field.metadata))


LEAVES = list(_walk(PipelineParams))


def _section_fields(path: tuple[str, ...]) -> set[str]:
    """The keys a section accepts (``()``: the top level; ``("train",)``: the model names)."""
    if path == ("train",):
        return set(MODELS)
    return {leaf.path[len(path)] for leaf in LEAVES if leaf.path[: len(path)] == path and len(leaf.path) > len(path)}


SECTIONS = sorted({leaf.path[:i] for leaf in LEAVES for i in range(len(leaf.path))})  # () included


def _strip_optional(annotation):
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)], True
    return annotation, False


def _bounds(metadata) -> dict:
    found = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt", "min_length"):
            if isinstance(item, getattr(at, {"min_length": "MinLen"}.get(name, name.capitalize()))):
                found[name] = getattr(item, name)
        if hasattr(item, "metadata"):  # a FieldInfo inside Annotated[int, Field(...)]
            found.update(_bounds(item.metadata))
    return found


def _kind(annotation):
    """(kind, detail, bounds) of a leaf: int, float, bool, str, enum, list (detail: the element), threads."""
    annotation, _ = _strip_optional(annotation)
    bounds = {}
    if typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        bounds = _bounds(extra)
    if annotation in (int, float, bool, str):
        return annotation.__name__, None, bounds
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "enum", annotation, bounds
    if typing.get_origin(annotation) is list:
        return "list", _kind(typing.get_args(annotation)[0]), bounds
    if typing.get_origin(annotation) in (Union, types.UnionType):  # tune.search_threads: a count or "physical"
        return "threads", None, bounds
    raise AssertionError(f"no strategy for {annotation!r}")


def _set(raw: dict, path: tuple[str, ...], value) -> dict:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return raw


def _fresh() -> dict:
    return json.loads(json.dumps(BASE))


def _refused(tmp_path: Path, raw: dict, key: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_params(path)
    message = str(error.value)
    assert str(path) in message and key in message, (key, message)
    return message


# ------------------------------------------------------------------------------------------ values

_NUMBERLIKE_BOOLS = {"true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0"}


def _numberlike(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda t: not _numberlike(t))
_containers = st.one_of(st.lists(st.integers(-5, 5), min_size=1, max_size=3),
                        st.dictionaries(_words, st.integers(0, 9), min_size=1, max_size=2))


def wrong_type(leaf: Leaf) -> st.SearchStrategy:
    kind, detail, _ = _kind(leaf.annotation)
    if kind in ("int", "float", "threads"):
        options = [_words.filter(lambda t: t != "physical"), _containers, st.booleans()]
        if kind == "int":
            options.append(st.integers(-1000, 1000).map(lambda v: v + 0.5))  # a fraction where a count belongs
        return st.one_of(*options)
    if kind == "bool":
        return st.one_of(_words.filter(lambda t: t.lower() not in _NUMBERLIKE_BOOLS), st.integers(2, 1000), _containers)
    if kind == "str":
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), _containers)
    if kind == "enum":
        return st.one_of(st.integers(), st.booleans(), _containers)
    # a list: a scalar or a mapping, or elements of the wrong type
    element = {"int": _words, "float": _words, "enum": st.integers(-3, 3)}[detail[0]]
    return st.one_of(_words, st.integers(), st.dictionaries(_words, st.integers(), min_size=1, max_size=2),
                     st.lists(element, min_size=1, max_size=3))


def _beyond(kind: str, bounds: dict) -> list[st.SearchStrategy]:
    """Numbers just or far outside each bound."""
    out = []
    if kind == "int":
        if "ge" in bounds:
            out.append(st.integers(bounds["ge"] - 10**9, bounds["ge"] - 1))
        if "gt" in bounds:
            out.append(st.integers(bounds["gt"] - 10**9, bounds["gt"]))
        if "le" in bounds:
            out.append(st.integers(bounds["le"] + 1, bounds["le"] + 2**70))
    else:
        finite = {"allow_nan": False, "allow_infinity": False}
        if "ge" in bounds:
            out.append(st.floats(bounds["ge"] - 1e9, bounds["ge"], exclude_max=True, **finite))
        if "gt" in bounds:
            out.append(st.floats(bounds["gt"] - 1e9, bounds["gt"], **finite))
        if "le" in bounds:
            out.append(st.floats(bounds["le"], bounds["le"] + 1e9, exclude_min=True, **finite))
        if "lt" in bounds:
            out.append(st.floats(bounds["lt"], bounds["lt"] + 1e9, **finite))
        out.append(st.sampled_from([math.nan, math.inf, -math.inf]))  # never a meaningful rate, scale or limit
    return out


#: list rules enforced by validators rather than annotations: (path ending, bad lists)
_BAD_SIZES = st.one_of(st.just([]), st.lists(st.integers(-10, 0), min_size=1, max_size=3))
_LIST_RULES = {
    "batch_sizes": _BAD_SIZES,
    "serving_batch_sizes": _BAD_SIZES,
    "serving_threads": st.one_of(st.just([]), st.lists(st.integers(-10, 0), min_size=1, max_size=3),
                                 st.integers(1, 8).map(lambda t: [t, t])),
    "variance_scales": st.one_of(st.just([]), st.lists(st.floats(-10, 0) | st.sampled_from([math.nan, math.inf]),
                                                       min_size=1, max_size=3)),
    "hidden": st.lists(st.integers(-10, 0), min_size=1, max_size=3),
    "models": st.one_of(st.just([]), st.sampled_from(MODELS).map(lambda m: [m, m])),
    "variants": st.just([]),
    "peers": st.just(["det_onnxruntime", "det_onnxruntime"]),
}


def out_of_range(leaf: Leaf) -> st.SearchStrategy | None:
    kind, detail, bounds = _kind(leaf.annotation)
    field_bounds = {**_bounds(leaf.metadata), **bounds}
    if kind in ("int", "float"):
        options = _beyond(kind, field_bounds)
    elif kind == "threads":
        options = [st.integers(-10**6, 0)]
    elif kind == "enum":  # a name that is not one of the choices
        names = {member.value for member in detail}
        options = [_words.filter(lambda t: t not in names)]
    elif kind == "list" and leaf.path[-1] in _LIST_RULES:
        options = [_LIST_RULES[leaf.path[-1]]]
    else:
        return None
    return st.one_of(*options) if options else None


RANGED = [leaf for leaf in LEAVES if out_of_range(leaf) is not None]


def valid_value(leaf: Leaf) -> st.SearchStrategy:
    kind, detail, bounds = _kind(leaf.annotation)
    optional = _strip_optional(leaf.annotation)[1]
    field_bounds = {**_bounds(leaf.metadata), **bounds}
    if kind == "list":
        element_kind, element, element_bounds = detail
        if element_kind == "enum":
            values = st.lists(st.sampled_from([m.value for m in element]), unique=True, min_size=1, max_size=4)
        elif element_kind == "float":
            values = st.lists(st.floats(1e-6, 100.0), min_size=1, max_size=4)
        else:
            values = st.lists(st.integers(1, 512), unique=leaf.path[-1] == "serving_threads", min_size=1, max_size=4)
        strategy = values
    elif kind == "int":
        low = field_bounds.get("ge", field_bounds.get("gt", -1) + 1)
        strategy = st.integers(low, field_bounds.get("le", low + 10**6))
    elif kind == "float":
        low = field_bounds.get("ge", field_bounds.get("gt", 0.0))
        high = field_bounds.get("le", field_bounds.get("lt", low + 1e6))
        strategy = st.floats(low, high, exclude_min="gt" in field_bounds, exclude_max="lt" in field_bounds)
    elif kind == "bool":
        strategy = st.booleans()
    elif kind == "str":
        strategy = _words
    elif kind == "enum":
        strategy = st.sampled_from([m.value for m in detail])
    else:
        strategy = st.one_of(st.just("physical"), st.integers(1, 64))
    return st.one_of(st.none(), strategy) if optional else strategy


#: leaves tied to others by a model validator: generated together by `_coupled` instead
COUPLED = {("ambiguous", "min_classes"), ("ambiguous", "max_classes"), ("ambiguous", "min_entropy"),
           ("ambiguous", "max_entropy"), ("tune", "target"), ("tune", "rpc", "tracker"), ("tune", "rpc", "key"),
           ("tune", "rpc", "emulated"), ("bundle", "targets"), ("models",)}
FREE = [leaf for leaf in LEAVES if leaf.path not in COUPLED]


@st.composite
def _coupled(draw) -> dict:
    values = {}
    low, high = sorted(draw(st.lists(st.integers(2, 10), min_size=2, max_size=2)))
    values[("ambiguous", "min_classes")], values[("ambiguous", "max_classes")] = low, high
    entropy = sorted(draw(st.lists(st.floats(0.0, 5.0), min_size=2, max_size=2, unique=True)))
    if entropy[1] > 0:
        values[("ambiguous", "min_entropy")], values[("ambiguous", "max_entropy")] = entropy
    if draw(st.booleans()):  # a board over RPC (emulated or not)
        values[("tune", "target")] = draw(st.sampled_from(["rasp4b", "rasp5"]))
        values[("tune", "rpc", "tracker")] = f"{draw(_words)}:{draw(st.integers(1, 65535))}"
        values[("tune", "rpc", "key")] = draw(_words)
        values[("tune", "rpc", "emulated")] = draw(st.booleans())
    values[("bundle", "targets")] = ["host", *draw(st.lists(st.sampled_from(["rasp4b", "rasp5"]), unique=True))]
    values[("models",)] = draw(st.lists(st.sampled_from(MODELS), unique=True, min_size=1))
    return values


def _read_back(params: PipelineParams, path: tuple[str, ...]):
    node: Any = params
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, list):
        return [item.value if isinstance(item, enum.Enum) else item for item in node]
    return node.value if isinstance(node, enum.Enum) else node


# ------------------------------------------------------------------------------------------ properties


@SETTINGS
@given(data=st.data())
def test_wrong_types_are_refused_naming_the_key(tmp_path, data):
    leaf = data.draw(st.sampled_from(LEAVES))
    value = data.draw(wrong_type(leaf))
    _refused(tmp_path, _set(_fresh(), leaf.path, value), leaf.key)
    record("bad_input", "params: wrong type", tried=1, survived=1)


@SETTINGS
@given(data=st.data())
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, data):
    leaf = data.draw(st.sampled_from(RANGED))
    value = data.draw(out_of_range(leaf))
    _refused(tmp_path, _set(_fresh(), leaf.path, value), leaf.key)
    record("bad_input", "params: out of range", tried=1, survived=1)


@SETTINGS
@given(data=st.data())
def test_unknown_keys_are_refused_naming_them(tmp_path, data):
    section = data.draw(st.sampled_from(SECTIONS + [("train",)]))
    key = data.draw(_words.filter(lambda k: k not in _section_fields(section)))
    raw = _fresh()
    node = raw
    for part in section:
        node = node.setdefault(part, {})
    node[key] = data.draw(st.one_of(st.integers(), _words, st.booleans()))
    _refused(tmp_path, raw, ".".join(section + (key,)))
    record("bad_input", "params: unknown key", tried=1, survived=1)


@SETTINGS
@given(data=st.data())
def test_wrong_nesting_is_refused_naming_the_key(tmp_path, data):
    raw = _fresh()
    how = data.draw(st.sampled_from(["moved", "section as scalar", "leaf as mapping", "dotted key"]))
    if how == "moved":  # a key in the wrong section: top level, another section, `train` without the model level
        leaf = data.draw(st.sampled_from(LEAVES))
        target = data.draw(st.sampled_from([s for s in SECTIONS + [("train",)]
                                            if s != leaf.path[:-1] and leaf.path[-1] not in _section_fields(s)]))
        _set(raw, target + (leaf.path[-1],), data.draw(valid_value(leaf)))
        key = ".".join(target + (leaf.path[-1],))
    elif how == "section as scalar":
        section = data.draw(st.sampled_from([s for s in SECTIONS if s] + [("train",)]))
        _set(raw, section, data.draw(st.one_of(st.integers(), _words, st.lists(st.integers(), max_size=2))))
        key = ".".join(section)
    elif how == "leaf as mapping":  # one level too deep
        leaf = data.draw(st.sampled_from(LEAVES))
        _set(raw, leaf.path, {data.draw(_words): data.draw(valid_value(leaf))})
        key = leaf.key
    else:  # `train.mlp.epochs: 3` written as one key
        leaf = data.draw(st.sampled_from([leaf for leaf in LEAVES if len(leaf.path) > 1]))
        raw[leaf.key] = data.draw(valid_value(leaf))
        key = leaf.key
    _refused(tmp_path, raw, key)
    record("bad_input", "params: wrong nesting", tried=1, survived=1)


@SETTINGS
@given(data=st.data())
def test_valid_files_are_accepted_as_written(tmp_path, data):
    chosen = data.draw(st.lists(st.sampled_from(FREE), unique_by=lambda leaf: leaf.path, max_size=25))
    values = {leaf.path: data.draw(valid_value(leaf)) for leaf in chosen}
    values.update(data.draw(_coupled()))
    raw = _fresh()
    for path, value in values.items():
        _set(raw, path, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    for key, value in values.items():
        assert _read_back(params, key) == value, key
    record("property", "params: valid files accepted", tried=1, survived=1)


# ------------------------------------------------------------------------------------------ probes


@pytest.mark.parametrize(("row", "key", "value"), [
    ("NaN or infinite learning rate / variance scale", ("train", "mlp", "lr"), math.nan),
    ("NaN or infinite learning rate / variance scale", ("train", "lenet", "lr"), math.inf),
    ("NaN or infinite learning rate / variance scale", ("calibrate", "variance_scales"), [0.5, math.nan]),
    ("NaN or infinite learning rate / variance scale", ("calibrate", "variance_scales"), [math.inf]),
    ("NaN or infinite learning rate / variance scale", ("promote", "max_latency_ratio"), math.inf),
    ("negative seed", ("seed",), -1),
    ("seed too large for numpy/torch", ("seed",), 2**32),
    ("seed too large for numpy/torch", ("seed",), 2**64),
    ("empty or repeated model list", ("models",), []),
    ("empty or repeated model list", ("models",), ["mlp", "mlp"]),
    ("boolean read as a number (epochs: true -> 1)", ("train", "mlp", "epochs"), True),
    ("boolean read as a number (epochs: true -> 1)", ("tune", "batch_sizes"), [True, 2]),
    ("unbounded counts and seeds (VAE width, search threads/seed)", ("ambiguous", "vae", "hidden"), [64, 0]),
    ("unbounded counts and seeds (VAE width, search threads/seed)", ("tune", "search_threads"), 0),
    ("unbounded counts and seeds (VAE width, search threads/seed)", ("tune", "search_seed"), -5),
])
def test_probe_values_once_accepted_are_refused(tmp_path, row, key, value):
    message = _refused(tmp_path, _set(_fresh(), key, value), ".".join(key))
    assert "\n" in message and "Traceback" not in message
    record("probe", f"params: {row} refused naming the key", tried=1, survived=1)


def _stage_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("content", ["latin-1", "folder"])
def test_unreadable_params_file_is_a_clear_error_at_the_entry_point(tmp_path, content):
    """`python -m tasks.prepare` on a params.yaml that is not UTF-8 (or is a folder): exit 2, one line naming the file."""
    params = tmp_path / "params.yaml"
    if content == "latin-1":
        params.write_bytes("seed: 0\n# Gewichtsvarianz für die Kalibrierung\n".encode("latin-1"))
    else:
        params.mkdir()
    done = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=tmp_path, env=_stage_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: params.yaml"), done.stderr[-3000:]
    assert ("not UTF-8" if content == "latin-1" else "not found (a folder)") in done.stderr
    assert not (tmp_path / "data").exists()
    record("probe", "params file not UTF-8 / a folder: clear error (was a UnicodeDecodeError traceback)", tried=1,
           survived=1)


#: a one-model params file, everything small (the benchmark's serving part briefly, no peers)
ONE_MODEL = {
    "models": ["mlp"], "train": {"mlp": {}},
    "data": {"mnist_dir": str(REPO / "data/embedded/mnist"), "ood_dir": str(REPO / "data/embedded/fashion-mnist")},
    "tune": {"batch_sizes": [2], "variants": ["pfp", "det"], "trials_per_task": 0, "svi_samples": 3, "number": 1,
             "min_repeat_ms": 1},
    "bundle": {"batch_sizes": [1, 2], "head_draws": 16},
    "benchmark": {"batch_sizes": [2], "svi_samples": 3, "repeat": 1, "warmup": 0, "tvm_number": 1, "tvm_repeat": 1,
                  "peers": [], "serving_batch_sizes": [2], "serving_threads": [1], "serving_rounds": 2,
                  "serving_turn_ms": 2.0, "serving_max_calls": 3, "serving_warmup": 0, "serving_torch_threads": 1,
                  "head_images": 12, "head_reference_draws": 1000},
}


def test_one_model_params_run_the_benchmark_stage_under_dvc(tmp_path):
    """dvc.yaml's benchmark stage once declared both models' plot folders, so `models: [mlp]` could not finish it."""
    from flows.workspace import prepare_workspace, stage_env
    from pfp.stage import bundle_dir
    from tests.common import make_bundle, write_model_artifacts, write_prepared

    source = tmp_path / "one-model.yaml"
    source.write_text(yaml.safe_dump(ONE_MODEL))
    workspace = prepare_workspace(tmp_path / "workspace", source, remote=str(tmp_path / "remote"))
    # the upstream stages' outputs of one (random) MLP: prepared data, posterior/pfp/calibration, host bundle
    write_prepared(workspace)
    write_model_artifacts(workspace, "mlp", variance_scale=0.5)
    make_bundle(workspace / bundle_dir("mlp", "host"), "mlp", batch_sizes=(1, 2), variance_scale=0.5, head_draws=16)
    env = {**stage_env("benchmark"), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", "benchmark"], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    latency = json.loads((workspace / "metrics/latency.json").read_text())
    assert set(latency) == {"mlp"} and latency["mlp"]["batch_2"]["pfp_tvm_ms"] > 0
    assert json.loads((workspace / "metrics/serving.json").read_text())["models"].keys() == {"mlp"}
    plots = sorted(p.relative_to(workspace).as_posix() for p in (workspace / "plots").rglob("*.png"))
    assert plots == ["plots/benchmark/mlp/latency.png"]
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]["benchmark"]
    assert "plots/benchmark" in {out["path"] for out in lock["outs"]}
    record("probe", "one-model params: the benchmark stage follows the model list (dvc.yaml named both models' plots)",
           tried=1, survived=1)

