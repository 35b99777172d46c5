"""A compiled library checked before it is loaded: size and sha256 against its record, and its ELF structure.

``dlopen`` maps a shared library's segments straight from the file: a truncated library kills
the process with SIGBUS when the missing pages are touched, and an empty or text file gives a
loader traceback. :func:`check_library` refuses all of them first, with one line naming the file:
the size and sha256 its writer recorded (when given), then the ELF header, the architecture, and
that every table and loadable segment lies inside the file. Standard library only (a board runs it).

Example::

    >>> record = library_record("pfp_b1.so")             # at export: {"size": ..., "sha256": ...}
    >>> check_library("pfp_b1.so", arch="x86_64", **record)  # before loading; LibraryError otherwise
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

__all__ = ["LibraryError", "check_library", "elf_arch", "file_sha256", "library_record", "private_copy"]

_ELF_MAGIC = b"\x7fELF"
_ET_DYN = 3
_PT_LOAD = 1
#: ELF e_machine -> the architecture names of ``platform.machine()`` (and of the targets)
_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


class LibraryError(RuntimeError):
    """A compiled library that must not be loaded: missing, empty, not a shared library, truncated,
    changed since it was recorded, or for another architecture."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_record(path: str | Path) -> dict[str, int | str]:
    """What a writer records of a file it wrote (``size`` in bytes and ``sha256``), for :func:`check_library`."""
    return {"size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def elf_arch(path: str | Path) -> str:
    """The architecture of the ELF shared library ``path`` (``x86_64``, ``aarch64``, ...), its structure checked.

    Raises :class:`LibraryError` when the file is empty, not an ELF shared library, or truncated
    (its program or section header table, or a loadable segment, reaches past the end of the file).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        data = handle.read(64)
        size = handle.seek(0, 2)
        if size == 0:
            raise LibraryError(f"{path}: empty file, not a compiled library")
        if not data.startswith(_ELF_MAGIC):
            raise LibraryError(f"{path}: not a compiled library (not an ELF file; it starts with {data[:16]!r})")
        if len(data) < 20 or data[4] not in (1, 2) or data[5] not in (1, 2):
            raise LibraryError(f"{path}: truncated or corrupt ELF header ({size} bytes)")
        wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
        header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        if len(data) < 16 + header.size:
            raise LibraryError(f"{path}: truncated ELF header ({size} bytes)")
        (e_type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = header.unpack_from(data, 16)
        arch = _MACHINES.get(machine, f"ELF machine {machine}")
        if e_type != _ET_DYN:
            raise LibraryError(f"{path}: an ELF file but not a shared library (type {e_type})")
        for what, offset, count, entry in (("program header table", phoff, phnum, phentsize),
                                           ("section header table", shoff, shnum, shentsize)):
            if offset + count * entry > size:
                raise LibraryError(f"{path}: truncated: its {what} ends at byte {offset + count * entry}, the file "
                                   f"has {size} bytes")
        segment = struct.Struct(order + ("IIQQQQ" if wide else "IIIIII"))
        if phnum and phentsize < segment.size:
            raise LibraryError(f"{path}: corrupt ELF header (program header entries of {phentsize} bytes)")
        handle.seek(phoff)
        table = handle.read(phnum * phentsize)
    for index in range(phnum):
        fields = segment.unpack_from(table, index * phentsize)
        # 64-bit: type, flags, offset, vaddr, paddr, filesz; 32-bit: type, offset, vaddr, paddr, filesz, memsz
        p_type, p_offset, p_filesz = (fields[0], fields[2], fields[5]) if wide else (fields[0], fields[1], fields[4])
        if p_type == _PT_LOAD and p_offset + p_filesz > size:
            raise LibraryError(f"{path}: truncated: a loadable segment ends at byte {p_offset + p_filesz}, the file "
                               f"has {size} bytes")
    return arch


def check_library(path: str | Path, *, arch: str | None = None, size: int | None = None,
                  sha256: str | None = None, recorded_in: str | Path | None = None) -> None:
    """Refuse (:class:`LibraryError`, naming ``path``) a library that is not safe to load.

    ``size`` and ``sha256``: what its writer recorded (in ``recorded_in``, named in the message);
    ``arch``: the architecture it must be built for.
    """
    path = Path(path)
    if not path.is_file():
        raise LibraryError(f"{path}: compiled library not found")
    where = recorded_in if recorded_in is not None else "its record"
    actual = path.stat().st_size
    if size is not None and actual != size:
        found = "an empty file" if actual == 0 else f"{actual} bytes"
        raise LibraryError(f"{path}: {found}, but {where} says {size} bytes: truncated, or from another export than "
                           "its metadata (an interrupted export?); re-export it")
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            raise LibraryError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., {where} says {sha256[:12]}...): "
                               "corrupt, or from another export than its metadata (an interrupted export?); re-export it")
    built_for = elf_arch(path)
    if arch is not None and built_for != arch:
        raise LibraryError(f"{path}: a library for {built_for}, not {arch}")


_COPIES: Path | None = None
_COPIES_LOCK = threading.Lock()


def private_copy(path: str | Path, sha256: str | None = None) -> Path:
    """A copy of the library ``path`` to ``dlopen`` in its place: this process's own, named by its sha256.

    The dynamic loader hands back the library already loaded under the same name (TVM loads by the
    real path, so a symlink does not help): a process that loaded ``model.so`` and loads it again
    after a re-export in place would run the old code (with the new weights, when they are
    parameters). A copy per content loads new code, and the same content once; and the mapped file
    is one nobody else writes (``cp`` over a mapped library truncates it under the process: SIGBUS).
    ``sha256``: the digest the file was checked against; a copy that differs is refused.
    """
    global _COPIES
    path = Path(path)
    with _COPIES_LOCK:
        if _COPIES is None:
            _COPIES = Path(tempfile.mkdtemp(prefix="pfp-libraries-"))
            atexit.register(shutil.rmtree, _COPIES, True)
        _COPIES.mkdir(exist_ok=True)  # a temp-folder cleaner may have removed it under a long-running process
        fd, tmp = tempfile.mkstemp(dir=_COPIES, suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            digest = file_sha256(tmp)
            if sha256 is not None and digest != sha256:
                raise LibraryError(f"{path}: changed while it was being loaded (sha256 {digest[:12]}..., checked "
                                   f"{sha256[:12]}...); load it again")
            copy = _COPIES / f"{digest[:32]}-{path.name}"
            if copy.exists():
                return copy
            os.replace(tmp, copy)
            return copy
        finally:
            Path(tmp).unlink(missing_ok=True)
