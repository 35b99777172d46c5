"""Setup for the infra tests: one TVM runtime thread, as in tests/backends/tvm (shared 2-core machine), and
the emulated Raspberry Pi 4 behind a real tracker, started once for every module that needs it."""

from __future__ import annotations

import os
import sys
import time

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "1")

from pfp import board as board_module  # noqa: E402
from pfp.backends.tvm.targets import ARM_CROSS_COMPILER  # noqa: E402

from ..backends.tvm.helpers import (  # noqa: E402
    RPC_DIR,
    free_port,
    start_process_group,
    start_tracker,
    stop_process_group,
    wait_for_key,
)
from ..common import require_command  # noqa: E402

SCRIPT = RPC_DIR / "emulated-pi.sh"
KEY = "rasp4b-emulated"  # the script's default key


@pytest.fixture(scope="session")
def script_env() -> dict:
    """The environment of infra/rpc/emulated-pi.sh (its defaults, this interpreter as the host Python)."""
    require_command("qemu-aarch64-static", "qemu-user-static")
    require_command(ARM_CROSS_COMPILER, "gcc-aarch64-linux-gnu")
    env = dict(os.environ, HOST_PYTHON=sys.executable, TVM_NUM_THREADS="1")
    for name in ("PYTHON", "RPC_KEY", "TVM_USE_RUNTIME_LIB"):  # the script's defaults, as documented
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def board(script_env, tmp_path_factory):
    """A tracker on 127.0.0.1 and the emulated board registered under KEY; yields the tracker address."""
    start = time.monotonic()
    board_module.emulated_pi_python()  # built on first use (about a minute), then cached
    print(f"emulated Pi ready ({time.monotonic() - start:.1f} s)")
    logs = tmp_path_factory.mktemp("emulated_pi_logs")
    port, server_port = free_port(), free_port()
    env = dict(script_env, PYTHON=sys.executable, TRACKER=f"127.0.0.1:{port}", SERVER_PORT=str(server_port),
               SERVER_PORT_END=str(server_port + 1))
    processes = []
    try:
        try:
            processes.append(start_tracker(env, port, logs / "tracker.log"))
            server_env = {name: value for name, value in env.items() if name != "PYTHON"}
            processes.append(start_process_group(["bash", str(SCRIPT), "start"], server_env, logs / "server.log"))
            seconds = wait_for_key(port, KEY, processes[1], logs / "server.log", timeout=240)
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        print(f"emulated board registered under {KEY!r} after {seconds:.1f} s")
        yield f"127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            stop_process_group(process)
