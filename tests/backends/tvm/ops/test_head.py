"""The compiled uncertainty head against its numpy reference (same draws) and a 10,000-draw Monte-Carlo estimate."""

from __future__ import annotations

import numpy as np
import pytest

from pfp.backends.tvm.ops import CompiledOp, packed_width, uncertainty_head
from pfp.backends.tvm.schedules import schedule_prim_func
from pfp.head import head_draws, head_reference, monte_carlo_reference

CLASSES = 10


def _logits(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 3, (batch, CLASSES)).astype(np.float32)
    var = rng.uniform(0, 4, (batch, CLASSES)).astype(np.float32)
    return mean, var


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_head_equals_the_numpy_reference(temperature):
    mean, var = _logits(6)
    var[0] = 0.0  # a deterministic row: MI 0
    mean[1] = [60.0] + [-60.0] * (CLASSES - 1)  # a saturated softmax: no NaN from log(0)
    draws = head_draws(64, CLASSES, seed=3)
    op = CompiledOp(uncertainty_head, [mean.shape, var.shape, draws.shape], inverse_temperature=1.0 / temperature)
    probs, mi, sme = op(mean, var, draws)
    reference = head_reference(mean, var, draws, temperature)
    np.testing.assert_allclose(probs, reference["probs"], atol=2e-6)
    np.testing.assert_allclose(mi, reference["mi"], atol=5e-6)
    np.testing.assert_allclose(sme, reference["sme"], atol=5e-6)
    assert np.all(np.isfinite(probs)) and mi[0] < 2e-6 and sme[1] < 1e-6  # float32 rounding of two equal entropies
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_packed_output_lays_out_every_summary_side_by_side():
    mean, var = _logits(3, seed=1)
    draws = head_draws(32, CLASSES)
    op = CompiledOp(uncertainty_head, [mean.shape, var.shape, draws.shape], inverse_temperature=1.0, packed=True)
    (packed,) = op(mean, var, draws)
    assert packed.shape == (3, packed_width(CLASSES)) == (3, 32)
    reference = head_reference(mean, var, draws, 1.0)
    np.testing.assert_allclose(packed[:, :10], reference["probs"], atol=2e-6)
    np.testing.assert_array_equal(packed[:, 10:20], mean)
    np.testing.assert_array_equal(packed[:, 20:30], var)
    np.testing.assert_allclose(packed[:, 30], reference["mi"], atol=5e-6)
    np.testing.assert_allclose(packed[:, 31], reference["sme"], atol=5e-6)


def test_hand_scheduled_head_computes_the_same():
    mean, var = _logits(4, seed=2)
    draws = head_draws(128, CLASSES)
    plain = CompiledOp(uncertainty_head, [mean.shape, var.shape, draws.shape], inverse_temperature=0.8, packed=True)
    scheduled = schedule_prim_func(plain.prim_func, target=plain.target)
    import tvm

    executable = tvm.compile(scheduled, target=plain.target)
    args = [tvm.runtime.tensor(a) for a in (mean, var, draws)]
    out = tvm.runtime.empty((4, packed_width(CLASSES)), "float32")
    executable["main"](*args, out)
    np.testing.assert_allclose(out.numpy(), plain(mean, var, draws)[0], rtol=1e-5, atol=1e-6)


def test_128_quasi_random_draws_are_close_to_10000_random_ones():
    """The error the deployed head trades for speed, on logits like a trained model's (shared noise: tight)."""
    mean, var = _logits(40, seed=4)
    var *= 0.25
    head = head_reference(mean, var, head_draws(128, CLASSES), 1.0)
    reference = monte_carlo_reference(mean, var, 1.0, draws=10_000, seed=5)
    # 10,000 random draws are themselves off by ~1/sqrt(10000) of the spread: the bound covers both
    assert np.abs(head["probs"] - reference["probs"]).max() < 0.02
    assert np.abs(head["mi"] - reference["mi"]).max() < 0.02
    assert np.abs(head["sme"] - reference["sme"]).max() < 0.02
    # and quasi-random beats random at the same count
    random_128 = monte_carlo_reference(mean, var, 1.0, draws=128, seed=6)
    assert np.abs(head["probs"] - reference["probs"]).mean() < np.abs(random_128["probs"] - reference["probs"]).mean()


def test_draws_are_standard_normal_and_fixed_by_the_seed():
    draws = head_draws(1024, CLASSES, seed=0)
    assert draws.shape == (1024, CLASSES) and draws.dtype == np.float32
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    np.testing.assert_array_equal(draws, head_draws(1024, CLASSES, seed=0))
    assert not np.array_equal(draws, head_draws(1024, CLASSES, seed=1))
    with pytest.raises(ValueError, match="at least 2 draws"):
        head_draws(1, CLASSES)
