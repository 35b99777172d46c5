"""Shared fixtures of the tuning tests: a tiny network and one local tuning of it (once per package)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("tvm")


from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm.graph import build_pfp_module  # noqa: E402
from pfp.backends.tvm.tuning.config import TuneReport  # noqa: E402
from pfp.backends.tvm.tuning.search import tune_module  # noqa: E402

from ..helpers import (  # noqa: E402,E501
    RPC_DIR,
    SPEC,
    fast_config,
    free_port,
    random_params,
    start_process_group,
    start_tracker,
    stop_process_group,
    wait_for_key,
)


@pytest.fixture(scope="package")
def case():
    params = random_params(SPEC, seed=0)
    x = torch.randn(1, *SPEC.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(SPEC, params, x)
    mod = build_pfp_module(SPEC, params, batch_size=1)
    return mod, x.numpy(), ref_mean, ref_var


@pytest.fixture(scope="package")
def local_tuning(case, tmp_path_factory):
    mod = case[0]
    config = fast_config(tmp_path_factory.mktemp("tune_local"))
    report = TuneReport()
    database = tune_module(mod, config=config, report=report)
    return config, database, report


@pytest.fixture(scope="package")  # one tracker and server for every test module that measures over RPC
def rpc_tracker(tmp_path_factory):
    """A real tracker and server (infra/rpc scripts) on 127.0.0.1; yields (address, key)."""
    logs = tmp_path_factory.mktemp("rpc_logs")
    port, server_port = free_port(), free_port()
    key = "pfp-test-cpu"
    env = dict(os.environ, PYTHON=sys.executable, TRACKER=f"127.0.0.1:{port}", RPC_KEY=key,
               SERVER_HOST="127.0.0.1", SERVER_PORT=str(server_port), SERVER_PORT_END=str(server_port + 1),
               TVM_NUM_THREADS="1")
    processes = []
    try:
        try:
            processes.append(start_tracker(env, port, logs / "tracker.log"))
            processes.append(start_process_group(["bash", str(RPC_DIR / "start-server.sh")], env, logs / "server.log"))
            wait_for_key(port, key, processes[1], logs / "server.log")
        except RuntimeError as error:
            pytest.fail(str(error))
        yield f"127.0.0.1:{port}", key
    finally:
        for process in reversed(processes):
            stop_process_group(process)
