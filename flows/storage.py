"""Shared storage: the DVC remote a workspace pushes its outputs to after a successful run.

A fresh clone of the workspace (its git history holds dvc.yaml, dvc.lock, params.yaml and the
uncached metrics and plots) configured with the same remote gets every cached output with
``dvc pull``; then ``dvc status`` is clean and ``dvc repro`` runs nothing.

The remote is any DVC remote URL (``s3://``, ``ssh://``, ... with the matching ``dvc-*`` plugin
installed) or a folder. Which one a workspace uses (:func:`flows.workspace.prepare_workspace`):
the ``--remote`` given, else ``$PFP_DVC_REMOTE``, else the default remote the workspace already
has, else the folder ``<workspace>.dvc-storage`` beside it. The repo workspace's default is in its
``.dvc/config`` (``../pfp-dvc-storage``, beside the clone); a ``--remote`` for it goes to
``.dvc/config.local`` so the committed file stays as it is.

    from flows.storage import configure_remote, push
    configure_remote(workspace, "/mnt/team/pfp-dvc")   # default remote "storage"
    push(workspace)  # {"remote": "storage", "url": "/mnt/team/pfp-dvc", "pushed": 12, "missing": 0}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

DEFAULT_REMOTE_NAME = "storage"
REMOTE_ENV = "PFP_DVC_REMOTE"
SIBLING_SUFFIX = ".dvc-storage"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(RuntimeError):
    """The remote is missing, misconfigured or refused a transfer (the message names it)."""


def _dvc_dir(workspace: str | Path) -> Path:
    dvc_dir = Path(workspace) / ".dvc"
    if not dvc_dir.is_dir():
        raise StorageError(f"{workspace}: not a DVC workspace (no .dvc folder)")
    return dvc_dir


def normalise_url(url: str | os.PathLike[str]) -> str:
    """A URL as given; a folder as an absolute path (relative to the working folder, ``~`` expanded)."""
    text = os.fspath(url).strip()
    if not text:
        raise StorageError("DVC remote: empty URL")
    return text if _URL.match(text) else str(Path(text).expanduser().resolve())


def sibling_url(workspace: str | Path) -> str:
    """The default storage of a separate workspace: the folder ``<workspace>.dvc-storage`` beside it."""
    workspace = Path(workspace).resolve()
    return str(workspace.with_name(workspace.name + SIBLING_SUFFIX))


def default_remote(workspace: str | Path) -> tuple[str, str] | None:
    """The workspace's default remote as (name, url), all config levels merged; None when it has none."""
    from dvc.config import Config

    config = Config(dvc_dir=str(_dvc_dir(workspace)))
    name = config["core"].get("remote")
    if not name:
        return None
    if name not in config["remote"]:
        raise StorageError(f"{workspace}/.dvc/config: default remote '{name}' is not defined (dvc remote list)")
    return name, str(config["remote"][name]["url"])


def configure_remote(workspace: str | Path, url: str | os.PathLike[str], name: str = DEFAULT_REMOTE_NAME,
                     *, local: bool = False) -> str:
    """Make ``url`` the workspace's default DVC remote ``name`` (in ``.dvc/config``, or ``config.local``).

    Returns the URL written (a folder as an absolute path). Other remotes are left alone.
    """
    from dvc.config import Config, ConfigError

    value = normalise_url(url)
    config = Config(dvc_dir=str(_dvc_dir(workspace)))
    try:
        with config.edit("local" if local else "repo") as conf:
            conf["remote"][name] = {**conf["remote"].get(name, {}), "url": value}
            conf["core"]["remote"] = name
    except ConfigError as error:
        raise StorageError(f"DVC remote '{name}' ({value}): {error}") from None
    return value


def push(workspace: str | Path, remote: str | None = None, jobs: int | None = None) -> dict[str, Any]:
    """``dvc push`` every cached output of the workspace's stages to ``remote`` (default: the default remote).

    Returns ``{"remote", "url", "pushed", "missing"}``: objects transferred now, and objects the
    remote still lacks afterwards (0 when the push is complete). Raises :class:`StorageError`
    naming the remote and its URL when there is none or the transfer fails.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    workspace = Path(workspace).resolve()
    configured = default_remote(workspace)
    if remote is None:
        if configured is None:
            raise StorageError(f"{workspace}: no default DVC remote; give one with --remote or {REMOTE_ENV}")
        remote = configured[0]
    with Repo(str(workspace)) as repo:
        if remote not in repo.config["remote"]:
            raise StorageError(f"{workspace}: DVC remote '{remote}' is not configured (dvc remote list)")
        url = str(repo.config["remote"][remote]["url"])
        try:
            pushed = repo.push(remote=remote, jobs=jobs)
            missing = sorted(_cloud_status(repo, remote))
        except (DvcException, OSError) as error:  # a folder remote fails with the OS's error
            raise StorageError(f"dvc push to remote '{remote}' ({url}) failed: {error}") from error
    if missing:
        raise StorageError(f"dvc push to remote '{remote}' ({url}): still missing there: {', '.join(missing[:5])}")
    return {"remote": remote, "url": url, "pushed": int(pushed), "missing": len(missing)}


def _cloud_status(repo, remote: str) -> dict[str, str]:
    """Output path -> what ``dvc status --cloud`` says the remote lacks ("new": only in the local cache,
    "missing": nowhere); "deleted" (only on the remote) is complete storage."""
    status = repo.status(cloud=True, remote=remote)
    return {path: str(state) for path, state in status.items() if state != "deleted"}
