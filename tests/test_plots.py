"""``pfp.plots``: every figure is a valid, non-empty PNG written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pfp import metrics as M
from pfp import plots as P

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png_alone(path: Path, expected: Path) -> None:
    assert Path(path) == expected
    data = expected.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    # nothing else (e.g. temp files) left in the folder
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name]


def _toy_probs(rng: np.random.Generator, n: int = 200, c: int = 10):
    logits = rng.normal(0, 2, (n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, c, n)
    return probs, labels


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng(0)
    p1, y1 = _toy_probs(rng)
    p2, y2 = _toy_probs(rng)
    bins = {"svi": M.reliability_bins(p1, y1), "pfp": M.reliability_bins(p2, y2)}
    out = tmp_path / "rel.png"
    _assert_png_alone(P.reliability_diagram(bins, out, "Reliability"), out)


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(0, 1, 100), rng.normal(1, 1, 80)
    fpr, tpr = M.roc_curve_points(s_in, s_out)
    curves = {
        "svi MI": (fpr, tpr, M.auroc(s_in, s_out)),
        "pfp MI": (fpr, tpr * 0.9, 0.7),
    }
    out = tmp_path / "roc.png"
    _assert_png_alone(P.roc_curves(curves, out, "OOD ROC"), out)


@pytest.mark.parametrize("log_y", [False, True])
def test_uncertainty_histograms(tmp_path, log_y):
    rng = np.random.default_rng(2)
    values = {
        "svi": {
            "mnist": rng.exponential(0.02, 300),
            "ambiguous": rng.exponential(0.1, 300),
            "fashion": rng.exponential(0.4, 300),
        },
        "pfp": {"mnist": np.zeros(50), "fashion": np.array([])},  # constant + empty
    }
    out = tmp_path / "mi.png"
    _assert_png_alone(
        P.uncertainty_histograms(values, out, "MI", "mutual information", log_y=log_y),
        out,
    )


def test_uncertainty_histograms_all_constant(tmp_path):
    out = tmp_path / "const.png"
    _assert_png_alone(
        P.uncertainty_histograms({"svi": {"mnist": np.zeros(10)}}, out, "t", "x"), out
    )


def test_loss_curve(tmp_path):
    losses = list(
        1000 * np.exp(-np.arange(200) / 50) + np.random.default_rng(3).normal(0, 5, 200)
    )
    out = tmp_path / "loss.png"
    _assert_png_alone(P.loss_curve(losses, out, "ELBO loss"), out)
    # missing folders are created; a single value works
    out2 = tmp_path / "sub" / "loss1.png"
    assert P.loss_curve([3.0], out2, "one", log_y=True) == out2
    assert out2.read_bytes()[:8] == PNG_SIGNATURE


def test_overwrite_existing(tmp_path):
    out = tmp_path / "loss.png"
    out.write_bytes(b"old")
    P.loss_curve([3.0, 2.0, float("nan"), 1.0], out, "x")
    _assert_png_alone(out, out)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        P.loss_curve([1.0, 2.0], tmp_path / "loss.png", "x")
    assert list(tmp_path.iterdir()) == []


def test_empty_inputs_raise(tmp_path):
    with pytest.raises(ValueError):
        P.reliability_diagram({}, tmp_path / "a.png", "t")
    with pytest.raises(ValueError):
        P.roc_curves({}, tmp_path / "b.png", "t")
    with pytest.raises(ValueError):
        P.uncertainty_histograms({}, tmp_path / "c.png", "t", "x")
    with pytest.raises(ValueError):
        P.loss_curve([], tmp_path / "d.png", "t")
    assert list(tmp_path.iterdir()) == []


def test_latency_vs_batch_writes_png(tmp_path):
    from pfp.plots import latency_vs_batch

    path = latency_vs_batch({"pfp_tvm_ms": {1: 0.1, 10: 0.5, 100: 4.0}, "svi_pyro_ms": {1: 150.0, 10: 160.0, 100: 190.0}},
                            tmp_path / "latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png"]


# --------------------------------------------------------------------------- series (CSV for dvc plots)
def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    import csv

    rows = list(csv.reader(path.read_text().splitlines()))
    return rows[0], rows[1:]


def test_roc_series_resamples_each_curve_on_one_grid(tmp_path):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(0, 1, 300), rng.normal(1.5, 1, 200)
    fpr, tpr = M.roc_curve_points(s_in, s_out)
    perfect = (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), 1.0)
    out = P.roc_series({"svi_mi": (fpr, tpr, 0.0), "oracle": perfect}, tmp_path / "roc.csv", points=101)
    assert out == tmp_path / "roc.csv" and sorted(p.name for p in tmp_path.iterdir()) == ["roc.csv"]
    header, rows = _read_csv(out)
    assert header == ["fpr", "svi_mi", "oracle"] and len(rows) == 101
    grid = np.array([float(r[0]) for r in rows])
    curve = np.array([float(r[1]) for r in rows])
    np.testing.assert_allclose(grid, np.linspace(0, 1, 101))
    assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
    # the resampled step curve keeps the AUROC to within the grid's resolution
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert abs(np.trapezoid(curve, grid) - roc_auc_score(labels, np.r_[s_in, s_out])) < 0.01
    # a vertical step counts at its top: the perfect detector is at 1 from fpr = 0 on
    assert all(float(r[2]) == 1.0 for r in rows)


def test_reliability_series_gaps_for_empty_bins(tmp_path):
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.55, 0.45]])
    labels = np.array([0, 1, 0])
    bins = {"svi": M.reliability_bins(probs, labels, n_bins=5), "pfp": M.reliability_bins(probs[::-1], labels, n_bins=5)}
    header, rows = _read_csv(P.reliability_series(bins, tmp_path / "rel.csv"))
    assert header == ["confidence", "ideal", "svi_accuracy", "svi_confidence", "svi_count",
                      "pfp_accuracy", "pfp_confidence", "pfp_count"]
    assert [float(r[0]) for r in rows] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    by_centre = {round(float(r[0]), 1): r for r in rows}
    assert by_centre[0.1][2:5] == ["", "", "0"]  # empty bin: no point
    assert float(by_centre[0.9][2]) == 0.5 and float(by_centre[0.9][3]) == pytest.approx(0.925) and by_centre[0.9][4] == "2"
    assert float(by_centre[0.5][2]) == 1.0 and by_centre[0.5][4] == "1"
    assert sum(int(r[4]) for r in rows) == 3 and sum(int(r[7]) for r in rows) == 3


def test_reliability_series_refuses_different_bins(tmp_path):
    probs, labels = np.array([[0.9, 0.1]]), np.array([0])
    with pytest.raises(ValueError, match="'pfp'.*edges"):
        P.reliability_series({"svi": M.reliability_bins(probs, labels, n_bins=5),
                              "pfp": M.reliability_bins(probs, labels, n_bins=10)}, tmp_path / "rel.csv")
    assert list(tmp_path.iterdir()) == []


def test_loss_series(tmp_path):
    header, rows = _read_csv(P.loss_series([2.5, float("nan"), 1.25], tmp_path / "loss.csv"))
    assert header == ["epoch", "elbo_loss"] and rows == [["1", "2.5"], ["2", ""], ["3", "1.25"]]
    with pytest.raises(ValueError, match="empty"):
        P.loss_series([], tmp_path / "empty.csv")


def test_fidelity_series_quantiles_per_option_and_set(tmp_path):
    ratios = {"pfp": {"mnist": np.arange(1, 102) / 100, "fashion": np.full(7, 0.5)}, "pfp_cov": {"mnist": np.ones(3)}}
    header, rows = _read_csv(P.fidelity_series(ratios, tmp_path / "fidelity.csv", points=11))
    assert header == ["quantile", "pfp_mnist", "pfp_fashion", "pfp_cov_mnist"] and len(rows) == 11
    assert [float(r[0]) for r in rows] == pytest.approx(np.linspace(0, 1, 11))
    assert [float(r[1]) for r in rows] == pytest.approx(np.linspace(0.01, 1.01, 11))  # linear interpolation
    assert {r[2] for r in rows} == {"0.5"} and {r[3] for r in rows} == {"1.0"}
    with pytest.raises(ValueError, match="empty"):
        P.fidelity_series({}, tmp_path / "empty.csv")
