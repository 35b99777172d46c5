"""Shared test setup.

The machine runs long jobs next to the tests: torch's intra-op thread pool would
oversubscribe the cores and make tiny tensor ops dozens of times slower, so every test runs
single-threaded (the previous setting is restored afterwards).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
