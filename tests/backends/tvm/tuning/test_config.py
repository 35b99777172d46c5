"""TuneConfig validation."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")


from pfp.backends.tvm.tuning.config import TuneConfig, parse_tracker  # noqa: E402

from ..helpers import fast_config  # noqa: E402


def test_switch_margin_must_be_a_fraction(tmp_path):
    with pytest.raises(ValueError, match="switch_margin must be a fraction in \\[0, 1\\], got 1.5"):
        fast_config(tmp_path, switch_margin=1.5)


def test_config_validation():
    with pytest.raises(ValueError, match="set both rpc_tracker"):
        TuneConfig(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(ValueError, match="host:port"):
        TuneConfig(rpc_tracker="localhost", rpc_key="x")
    with pytest.raises(ValueError, match="trials_per_task"):
        TuneConfig(trials_per_task=0)
    assert parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)
