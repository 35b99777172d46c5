"""Bundles of random posteriors shared by the runtime tests (one TVM runtime thread: a shared 2-core machine)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "1")

from ..common import make_bundle  # noqa: E402


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory):
    """An MLP bundle compiled for batch sizes 1 and 4 (BuiltBundle)."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "mlp", "mlp", batch_sizes=(1, 4))


@pytest.fixture(scope="session")
def lenet_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "lenet", "lenet", batch_sizes=(1, 4), temperature=0.9,
                       variance_scale=1.2, seed=3)
