"""Fixtures shared by the backend tests: a random MLP posterior, its PFP model, images."""

from __future__ import annotations

import numpy as np
import pytest

from pfp.convert import convert_posterior

from ..common import random_posterior


@pytest.fixture(scope="module")
def models():
    """(posterior, PFP model) of a random MLP."""
    posterior = random_posterior("mlp", seed=5)
    return posterior, convert_posterior(posterior)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
