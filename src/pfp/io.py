"""Atomic file output: write to a temp file in the target folder, then rename.

A crash or a bad input never leaves a half-written output behind for DVC to cache: a writer
killed mid-write (even by SIGKILL) leaves only its temp file, which the next write of the same
path removes; a full disk raises :class:`WriteFailed` naming the file, and the file keeps its
previous content.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

#: errors that mean "no room for this file" rather than a bug: reported as WriteFailed
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(OSError):
    """An output could not be written for lack of space (disk full, quota, file size limit); names the file."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` whose writer is gone (killed mid-write): they are never outputs."""
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; it replaces ``path`` only if the block succeeds.

    The temp file's name carries the writer's pid, so a later write can tell a dead writer's
    leftover from a live one's. The data is fsynced before the rename: after a crash of the
    machine the path holds the old or the new file, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix or path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as error:
            if error.errno not in _NO_SPACE:
                raise
            try:
                free = f"{shutil.disk_usage(path.parent).free} bytes free"
            except OSError:
                free = "free space unknown"
            failure = WriteFailed(f"cannot write {path}: {os.strerror(error.errno)} ({free} on its file system; "
                                  f"{'the previous file is unchanged' if path.exists() else 'nothing was written'})")
            failure.errno = error.errno  # one clean line (OSError(errno, text) would print "[Errno 28] ...")
            raise failure from error
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
