"""What keeps pipeline runs from stepping on each other.

- One run per workspace: an exclusive ``flock`` on ``WORKSPACE/.pfp-pipeline.lock``, whatever
  started the run (a deployment's worker, ``make run``, a second terminal). Works without a
  Prefect server: the quick start's runs each have a temporary one, which cannot see the other's.
  A second run is refused with a message naming the run that holds the workspace (a deployment
  itself queues its runs: ``concurrency_limit=1`` in flows/deployment.py).
- One measurement per RPC board key: a Prefect global concurrency limit ``rpc-board:KEY`` of one
  slot around every stage that measures on the key's boards, so runs of different workspaces
  that share a Prefect server take turns on a board.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".pfp-pipeline.lock"
BOARD_LIMIT_PREFIX = "rpc-board:"


#: the workspace locks this process holds
_HELD: set[Path] = set()


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    run = f", Prefect flow run {holder['flow_run']}" if holder.get("flow_run") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{run}, since {since}"


@contextmanager
def workspace_lock(workspace: Path, *, flow_run: str | None = None) -> Iterator[Path]:
    """Hold ``workspace`` for this run; raise :class:`WorkspaceBusy` at once if another run holds it.

    The lock is the kernel's, so it goes with the process that held it, even after a SIGKILL.
    Re-entrant within a process: the command line takes it before it touches the workspace (its
    log), the flow again when it starts (a deployment's runs start there).
    """
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    path = workspace / LOCK_FILE
    if path in _HELD:  # this process holds it already (a second flock would refuse ourselves)
        yield path
        return
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"workspace {workspace} is in use by another pipeline run ({_holder_text(path)}); "
                                "this run was refused so the two cannot interleave: wait for it to finish, or give "
                                "this run another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "flow_run": flow_run}))
        handle.flush()
        _HELD.add(path)
        try:
            yield path
        finally:
            _HELD.discard(path)
    finally:
        handle.close()  # releases the lock


def board_limit_name(key: str) -> str:
    return f"{BOARD_LIMIT_PREFIX}{key}"


def ensure_board_limit(key: str) -> str:
    """The Prefect global concurrency limit for board ``key`` (one slot), created when missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = board_limit_name(key)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it in between
                pass
    return name


@contextmanager
def board_slot(key: str | None) -> Iterator[None]:
    """Hold board ``key``'s slot while measuring on it (nothing to hold for host-only stages)."""
    if key is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(ensure_board_limit(key), occupy=1, strict=True):
        yield
