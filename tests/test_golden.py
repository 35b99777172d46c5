"""Structure refactors change no behaviour: a golden record taken before the code moved.

``tests/golden/`` holds, recorded once from the code before the architecture change (issue 18):
- ``tir_hashes.json``: the structural hash of every hand-scheduled TIR function the project
  compiles (PFP joint and separate, deterministic twin, SVI-30 ensemble; MLP and LeNet in the
  converted layer order; batch 1, 10, 100);
- ``outputs.npz``: the outputs of every network on fixed inputs and fixed random weights: the
  PyTorch PFP reference, the deterministic twin, the sampled SVI member (local
  reparameterization, seeded), the batched ensemble, and the compiled TVM modules (batch 10).

The test recomputes both with the current code. Hashes must be equal; outputs equal within
float32 round-off. Re-record only for an intended change of the compiled code or the numerics
(``python -m tests.test_golden --record``), and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
MODELS = ("mlp", "lenet")
VARIANTS = ("pfp", "pfp_separate", "det", "svi")
BATCH_SIZES = (1, 10, 100)
OUTPUT_BATCH = 10
ENSEMBLE_MEMBERS = 30
#: float32 round-off: summation order may change with a schedule, nothing else may
RTOL, ATOL = 2e-5, 1e-6


def _spec(model: str):
    from pfp.convert import pool_before_relu
    from pfp.spec import build_spec

    return pool_before_relu(build_spec(model))


def _params(spec, seed: int = 0):
    """Random mean-field posterior (N(0, 1/fan_in) means, variances in [1e-4, 1e-2])."""
    from pfp.backends.torch_ref import GaussianLayerParams

    generator = torch.Generator().manual_seed(seed)
    params = {}
    for layer in spec.parametric_layers():
        fan_in = int(np.prod(layer.weight_shape[1:]))
        weight_mean = torch.randn(layer.weight_shape, generator=generator) / fan_in**0.5
        weight_var = 1e-4 + (1e-2 - 1e-4) * torch.rand(layer.weight_shape, generator=generator)
        bias_mean = 0.1 * torch.randn(layer.bias_shape, generator=generator)
        bias_var = 1e-4 + (1e-2 - 1e-4) * torch.rand(layer.bias_shape, generator=generator)
        params[layer.name] = GaussianLayerParams.from_mean_var(weight_mean, weight_var, bias_mean, bias_var)
    return params


def _stacked(spec, params, members: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    stacked = {}
    for layer in spec.parametric_layers():
        p = params[layer.name]
        weight = p.weight_mean + p.weight_var.sqrt() * torch.randn((members, *p.weight_mean.shape), generator=generator)
        bias = p.bias_mean + p.bias_var.sqrt() * torch.randn((members, *p.bias_mean.shape), generator=generator)
        stacked[layer.name] = (weight, bias)
    return stacked


def _images(batch: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (batch, 1, 28, 28)).astype(np.float32)


def _modules(model: str, batch: int):
    """{variant: Relax module} of one model and batch size, weights bound as constants."""
    from pfp.backends.tvm import graph as build

    spec = _spec(model)
    params = _params(spec)
    means = {name: (p.weight_mean, p.bias_mean) for name, p in params.items()}
    return {
        "pfp": build.build_pfp_module(spec, params, batch_size=batch, joint=True),
        "pfp_separate": build.build_pfp_module(spec, params, batch_size=batch, joint=False),
        "det": build.build_deterministic_module(spec, means, batch_size=batch),
        "svi": build.build_ensemble_module(spec, _stacked(spec, params, ENSEMBLE_MEMBERS), batch_size=batch),
    }


def scheduled_hashes(model: str, batch: int) -> dict[str, dict[str, int]]:
    """{variant: {TIR function: structural hash}} after operator fusion and the hand schedules."""
    import tvm_ffi
    from tvm import tirx

    from pfp.backends.tvm.pipeline import fuse_operators
    from pfp.backends.tvm.schedules import HandSchedule
    from pfp.backends.tvm.targets import make_target

    target = make_target("host")
    hashes = {}
    for variant, mod in _modules(model, batch).items():
        with target:
            scheduled = HandSchedule()(fuse_operators(mod, target))
        hashes[variant] = {gvar.name_hint: int(tvm_ffi.structural_hash(func))
                           for gvar, func in scheduled.functions_items() if isinstance(func, tirx.PrimFunc)}
    return hashes


def torch_outputs(model: str) -> dict[str, np.ndarray]:
    from pfp.backends.torch_ref import deterministic_forward, ensemble_forward, pfp_forward, sampled_forward
    from pfp.spec import build_spec

    out = {}
    x = torch.from_numpy(_images(OUTPUT_BATCH))
    for order, spec in (("converted", _spec(model)), ("trained", build_spec(model))):
        params = _params(spec)
        means = {name: (p.weight_mean, p.bias_mean) for name, p in params.items()}
        moments = {name: ((p.weight_mean, p.weight_var.sqrt()), (p.bias_mean, p.bias_var.sqrt()))
                   for name, p in params.items()}
        with torch.no_grad():
            mean, var = pfp_forward(spec, params, x)
            out[f"{model}/{order}/torch_pfp_mean"], out[f"{model}/{order}/torch_pfp_var"] = mean.numpy(), var.numpy()
            mean, var = pfp_forward(spec, params, x, variance_scale=0.5)
            out[f"{model}/{order}/torch_pfp_scaled_mean"] = mean.numpy()
            out[f"{model}/{order}/torch_pfp_scaled_var"] = var.numpy()
            out[f"{model}/{order}/torch_det"] = deterministic_forward(spec, means, x).numpy()
            torch.manual_seed(3)
            out[f"{model}/{order}/torch_sampled"] = sampled_forward(spec, moments, x).numpy()
            out[f"{model}/{order}/torch_ensemble"] = ensemble_forward(spec, _stacked(spec, params, 4), x).numpy()
    return out


def tvm_outputs(model: str) -> dict[str, np.ndarray]:
    from pfp.backends.tvm.pipeline import compile_module
    from pfp.backends.tvm.runtime import CompiledDeterministic, CompiledEnsemble, CompiledPFP

    classes = {"pfp": CompiledPFP, "pfp_separate": CompiledPFP, "det": CompiledDeterministic,
               "svi": CompiledEnsemble}
    x = _images(OUTPUT_BATCH)
    out = {}
    for variant, mod in _modules(model, OUTPUT_BATCH).items():
        compiled = classes[variant](compile_module(mod, "host", "hand"), x.shape, target="host")
        for index, value in enumerate(compiled.run(x)):
            out[f"{model}/tvm_{variant}/{index}"] = value
    return out


def record() -> None:
    GOLDEN.mkdir(exist_ok=True)
    hashes = {f"{model}/b{batch}": scheduled_hashes(model, batch) for model in MODELS for batch in BATCH_SIZES}
    (GOLDEN / "tir_hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    outputs = {}
    for model in MODELS:
        outputs.update(torch_outputs(model))
        outputs.update(tvm_outputs(model))
    np.savez_compressed(GOLDEN / "outputs.npz", **outputs)
    print(f"recorded {sum(len(f) for v in hashes.values() for f in v.values())} TIR hashes, {len(outputs)} outputs")


def _recorded_outputs(prefix: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "outputs.npz") as archive:
        return {key: archive[key] for key in archive.files if key.startswith(prefix)}


def _assert_outputs(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=RTOL, atol=ATOL * float(np.abs(value).max()), err_msg=key)


@pytest.mark.parametrize("model", MODELS)
def test_torch_outputs_match_the_golden_record(model):
    _assert_outputs(torch_outputs(model), {k: v for k, v in _recorded_outputs(f"{model}/").items() if "/tvm_" not in k})


@pytest.mark.parametrize("model", MODELS)
def test_compiled_outputs_match_the_golden_record(model):
    _assert_outputs(tvm_outputs(model), _recorded_outputs(f"{model}/tvm_"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_scheduled_tir_matches_the_golden_record(model, batch):
    recorded = json.loads((GOLDEN / "tir_hashes.json").read_text())[f"{model}/b{batch}"]
    actual = scheduled_hashes(model, batch)
    for variant in VARIANTS:
        changed = sorted(name for name in recorded[variant] if actual[variant].get(name) != recorded[variant][name])
        assert sorted(actual[variant]) == sorted(recorded[variant]), f"{variant}: functions differ"
        assert not changed, f"{model} b{batch} {variant}: scheduled TIR changed in {changed}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_golden --record")
    record()
