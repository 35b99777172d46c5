"""The reliability report's own rules (its rows are the figures README quotes)."""

import pytest

from tests.reliability import report


def test_markdown_sums_per_kind_and_names_the_tests():
    text = report.markdown([
        {"kind": "fault", "row": "server killed", "tried": 2, "survived": 2, "tests": ["tests/a.py::test_x"]},
        {"kind": "bad_input", "row": "IDX bytes flipped", "tried": 50, "survived": 49, "tests": ["tests/b.py::test_y"]},
        {"kind": "fault", "row": "disk full", "tried": 1, "survived": 1, "tests": ["tests/c.py::test_z"]},
    ])
    assert "- fault cases injected into real processes (a burst counts each request): 3 tried, 3 survived" in text
    assert "- bad-input cases tried (refused with a clear error): 50 tried, 49 survived" in text
    assert "| bad_input | IDX bytes flipped | 50 | 49 | `tests/b.py::test_y` |" in text


@pytest.mark.parametrize(("kind", "tried", "survived"), [("faults", 1, 1), ("fault", 1, 2), ("fault", 1, -1)])
def test_record_refuses_unknown_kinds_and_impossible_counts(kind, tried, survived):
    with pytest.raises(ValueError):
        report.record(kind, "row", tried=tried, survived=survived)


def test_merge_adds_a_workers_rows_to_the_same_rows_and_names_every_test(monkeypatch):
    """Under pytest-xdist each worker records its own rows; the controller merges them (tests/conftest.py)."""
    monkeypatch.setattr(report, "_ROWS", {})
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/a.py::test_x[1] (call)")
    report.record("fault", "server killed", tried=2, survived=2)
    report.merge([{"kind": "fault", "row": "server killed", "tried": 1, "survived": 0, "tests": ["tests/b.py::test_y", "tests/a.py::test_x"]},
                  {"kind": "probe", "row": "torn file", "tried": 3, "survived": 3, "tests": ["tests/c.py::test_z"]}])
    (probe,) = [r for r in report.rows() if r.kind == "probe"]
    (fault,) = [r for r in report.rows() if r.kind == "fault"]
    assert (fault.tried, fault.survived, fault.tests) == (3, 2, ["tests/a.py::test_x", "tests/b.py::test_y"])
    assert (probe.tried, probe.survived, probe.tests) == (3, 3, ["tests/c.py::test_z"])
