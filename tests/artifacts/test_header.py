"""Artifact headers: kind, model, parent hash and format, parsed strictly; sha256 of a file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from pfp.artifacts.header import ArtifactHeader, sha256_of


def test_header_round_trip_and_sha256(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    header = ArtifactHeader(kind="tvm_library", model="lenet", parent_sha256=sha256_of(path), format=2)
    assert ArtifactHeader.from_json(header.to_json()) == header
    assert ArtifactHeader.from_dict({"kind": "posterior", "model": "mlp", "format": 1}).parent_sha256 is None


@pytest.mark.parametrize("value", [
    "[1, 2]",
    '{"kind": "posterior", "model": "mlp"}',
    '{"kind": "posterior", "model": "mlp", "format": 1, "colour": "red"}',
    '{"kind": "posterior", "model": "", "format": 1}',
    '{"kind": "posterior", "model": "mlp", "format": 0}',
    '{"kind": "posterior", "model": "mlp", "format": 1, "parent_sha256": "abc"}',
    "not json",
], ids=["list", "no-format", "unknown-key", "empty-model", "format-0", "short-sha", "not-json"])
def test_malformed_header_is_refused(value):
    with pytest.raises(ValueError):
        ArtifactHeader.from_json(value)


def test_header_module_imports_neither_torch_nor_a_kind():
    """The compiled libraries' metadata (a torch-free runtime) can reuse it."""
    code = ("import sys, pfp.artifacts.header; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pyro') or m.startswith('pfp.artifacts.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "['pfp.artifacts.header']"
