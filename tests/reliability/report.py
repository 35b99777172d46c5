"""The figures of the reliability suite: what each test injected or tried, and what survived.

A test calls :func:`record` once, after its assertions passed (a failing test records nothing),
e.g. ``record("fault", "tuning SIGKILL mid-search", tried=1, survived=1)`` or
``record("property", "relu_gaussian (tvm)", tried=examples, survived=examples)``. At the end of
the session (``tests/conftest.py``) the rows, summed per (kind, row) with the tests that produced
them, are printed as a table and written to ``$PFP_RELIABILITY_REPORT`` (default
``reliability-report.json`` in the working directory; under pytest-xdist the controller merges
its workers' rows first); ``python -m tests.reliability.report FILE``
renders that file as README's Markdown table.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

#: what each kind of row counts
KINDS = {
    "fault": "fault cases injected into real processes (a burst counts each request)",
    "bad_input": "bad-input cases tried (refused with a clear error)",
    "property": "property-test examples run",
    "probe": "defects found by probing, fixed and tested",
}
DEFAULT_REPORT = "reliability-report.json"


@dataclass
class Row:
    kind: str
    row: str
    tried: int = 0
    survived: int = 0
    tests: list[str] = field(default_factory=list)


_ROWS: dict[tuple[str, str], Row] = {}
_LOCK = threading.Lock()


def _current_test() -> str:
    """The running test's node id without parameters (``PYTEST_CURRENT_TEST`` minus its phase)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "unknown").rsplit(" ", 1)[0]
    return current.split("[", 1)[0]


def record(kind: str, row: str, *, tried: int, survived: int) -> None:
    """Add ``tried`` cases of ``row`` (``survived`` of them survived) under ``kind`` (see :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown reliability kind {kind!r}; one of {sorted(KINDS)}")
    if not (0 <= survived <= tried):
        raise ValueError(f"survived ({survived}) must be within 0..tried ({tried})")
    _add(kind, row, tried, survived, [_current_test()])


def merge(entries: list[dict]) -> None:
    """Add rows recorded in another process (a pytest-xdist worker's, as :func:`rows` gives them)."""
    for e in entries:
        _add(e["kind"], e["row"], e["tried"], e["survived"], e["tests"])


def _add(kind: str, row: str, tried: int, survived: int, tests: list[str]) -> None:
    with _LOCK:
        entry = _ROWS.setdefault((kind, row), Row(kind, row))
        entry.tried += tried
        entry.survived += survived
        entry.tests.extend(t for t in tests if t not in entry.tests)


def rows() -> list[Row]:
    with _LOCK:
        return sorted(_ROWS.values(), key=lambda r: (list(KINDS).index(r.kind), r.row))


def write(path: str | Path) -> Path:
    path = Path(path)
    payload = {"rows": [r.__dict__ for r in rows()]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path


def markdown(entries: list[dict]) -> str:
    """README's table: one row per (kind, row) with the totals and the tests that produced it."""
    lines = ["| kind | what | tried | survived | test |", "|---|---|---:|---:|---|"]
    totals: dict[str, list[int]] = {}
    for e in entries:
        tests = "<br>".join(f"`{t}`" for t in e["tests"])
        lines.append(f"| {e['kind']} | {e['row']} | {e['tried']} | {e['survived']} | {tests} |")
        total = totals.setdefault(e["kind"], [0, 0])
        total[0] += e["tried"]
        total[1] += e["survived"]
    summary = [f"- {KINDS[k]}: {t} tried, {s} survived" for k, (t, s) in totals.items()]
    return "\n".join(summary + [""] + lines)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_REPORT)
    print(markdown(json.loads(source.read_text())["rows"]))
