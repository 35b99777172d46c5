"""Evaluation figures written as PNG files, and the series behind them as CSV.

The CSV series (``*_series``) are what ``dvc plots diff`` overlays across revisions (the
top-level ``plots:`` of dvc.yaml): one row per x value, one column per curve, so each
revision's curves share their x values and DVC draws them as lines of one chart.

matplotlib is imported lazily inside each function, and every figure is drawn on an
explicit Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so no
display is needed and the process-wide pyplot backend/state is never touched.
Each function writes its PNG atomically: it renders to a temporary file in the
destination folder and then ``os.replace``-s it onto ``path``. All return the
final :class:`pathlib.Path`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pfp.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from pfp.metrics import ReliabilityBins

__all__ = ["fidelity_series", "loss_curve", "loss_series", "reliability_diagram", "reliability_series", "roc_curves", "roc_series",
           "uncertainty_histograms"]

# ROC curves are resampled on this false-positive-rate grid so all curves of all revisions share x values.
ROC_GRID_POINTS = 201

# Fixed colours per data set so figures are comparable across methods/runs.
_DATASET_COLORS = {
    "mnist": "tab:blue",
    "ambiguous": "tab:orange",
    "fashion": "tab:red",
}


def _new_figure(
    n_panels: int = 1, panel_size: tuple[float, float] = (4.5, 4.2)
) -> tuple[Figure, list[Any]]:
    """A figure with ``n_panels`` side-by-side axes on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_panels = max(1, n_panels)
    fig = Figure(
        figsize=(panel_size[0] * n_panels, panel_size[1]), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to PNG at ``path`` via a temp file in the same folder + rename."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def _require_nonempty(mapping: Mapping[str, Any], name: str) -> None:
    if not mapping:
        raise ValueError(f"{name} is empty: nothing to plot")


# --------------------------------------------------------------------------- reliability
def reliability_diagram(
    bins_by_method: Mapping[str, ReliabilityBins],
    path: str | os.PathLike[str],
    title: str = "Reliability diagram",
) -> Path:
    """One panel per method: per-bin accuracy bars vs confidence, the diagonal and the ECE.

    Parameters
    ----------
    bins_by_method : mapping method name -> :class:`pfp.metrics.ReliabilityBins`
    path : output PNG path
    title : figure title
    """
    _require_nonempty(bins_by_method, "bins_by_method")
    fig, axes = _new_figure(len(bins_by_method))
    for ax, (method, rb) in zip(axes, bins_by_method.items()):
        edges = np.asarray(rb.edges, dtype=float)
        acc = np.asarray(rb.accuracy, dtype=float)
        conf = np.asarray(rb.confidence, dtype=float)
        counts = np.asarray(rb.counts)
        widths = np.diff(edges)
        left = edges[:-1]
        filled = counts > 0
        ax.bar(
            left[filled],
            acc[filled],
            width=widths[filled],
            align="edge",
            color="tab:blue",
            edgecolor="black",
            linewidth=0.6,
            label=f"accuracy (ECE = {rb.ece:.4f})",
        )
        # gap between confidence and accuracy, drawn as hatched outline bars
        ax.bar(
            left[filled],
            conf[filled] - acc[filled],
            bottom=acc[filled],
            width=widths[filled],
            align="edge",
            fill=False,
            edgecolor="tab:red",
            hatch="//",
            linewidth=0.6,
            label="gap",
        )
        ax.plot(
            [0, 1],
            [0, 1],
            linestyle="--",
            color="gray",
            linewidth=1.0,
            label="perfect calibration",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{method} (n = {int(counts.sum())})")
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            fontsize="small",
            frameon=False,
        )
    fig.suptitle(title)
    return _save_atomic(fig, path)


# --------------------------------------------------------------------------- ROC
def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | os.PathLike[str],
    title: str = "OOD ROC",
) -> Path:
    """All ROC curves on one panel; legend entries carry the AUROC.

    Parameters
    ----------
    curves : mapping label -> (fpr, tpr, auc)
    path : output PNG path
    title : figure title
    """
    _require_nonempty(curves, "curves")
    fig, (ax,) = _new_figure(1, panel_size=(5.0, 4.6))
    for label, (fpr, tpr, auc) in curves.items():
        fpr = np.asarray(fpr, dtype=float)
        tpr = np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(
                f"curves[{label!r}]: fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D shapes"
            )
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{label} (AUROC = {float(auc):.4f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _save_atomic(fig, path)


# --------------------------------------------------------------------------- histograms
def uncertainty_histograms(
    values: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike[str],
    title: str = "Uncertainty",
    xlabel: str = "value",
    log_y: bool = False,
    n_bins: int = 50,
) -> Path:
    """One panel per method with overlaid density histograms per data set.

    Parameters
    ----------
    values : mapping method -> data set -> 1-D values, e.g. ``values["svi"]["mnist"]``
        = MI per example. All panels share the same bin edges.
    path : output PNG path
    title, xlabel : figure title and x-axis label
    log_y : logarithmic density axis
    n_bins : number of histogram bins
    """
    _require_nonempty(values, "values")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive; got {n_bins}")
    cleaned: dict[str, dict[str, np.ndarray]] = {}
    finite_parts = []
    for method, by_ds in values.items():
        cleaned[method] = {}
        for ds, arr in by_ds.items():
            a = np.asarray(arr, dtype=float).ravel()
            a = a[np.isfinite(a)]
            cleaned[method][ds] = a
            if a.size:
                finite_parts.append(a)
    if finite_parts:
        all_vals = np.concatenate(finite_parts)
        lo, hi = float(all_vals.min()), float(all_vals.max())
    else:
        lo, hi = 0.0, 1.0
    if not hi > lo:  # constant data (e.g. MI == 0 everywhere)
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, n_bins + 1)

    fig, axes = _new_figure(len(cleaned))
    fallback = iter(
        ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
        * 10
    )
    colors: dict[str, str] = {}
    for ax, (method, by_ds) in zip(axes, cleaned.items()):
        for ds, a in by_ds.items():
            if ds not in colors:
                colors[ds] = _DATASET_COLORS.get(ds.lower(), None) or next(fallback)
            if a.size == 0:
                continue
            color = colors[ds]
            ax.hist(
                a,
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.3,
                color=color,
            )
            ax.hist(
                a,
                bins=edges,
                density=True,
                histtype="step",
                linewidth=1.2,
                color=color,
                label=f"{ds} (n = {a.size}, mean = {a.mean():.3g})",
            )
        if log_y:
            ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_title(method)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save_atomic(fig, path)


# --------------------------------------------------------------------------- loss curve
def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaNs (shorter window at the start)."""
    valid = np.isfinite(y)
    yv = np.where(valid, y, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(yv)])
    ccnt = np.concatenate([[0], np.cumsum(valid)])
    idx = np.arange(1, y.size + 1)
    start = np.maximum(idx - window, 0)
    num = csum[idx] - csum[start]
    den = ccnt[idx] - ccnt[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def loss_curve(
    losses: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    title: str = "ELBO loss",
    xlabel: str = "epoch",
    ylabel: str = "loss",
    window: int | None = None,
    log_y: bool = False,
) -> Path:
    """Raw loss per epoch/step (thin line) with a moving-average smoothed line.

    Parameters
    ----------
    losses : 1-D sequence of loss values (non-finite values are drawn as gaps)
    path : output PNG path
    title, xlabel, ylabel : labels
    window : moving-average window; default ``max(1, len(losses) // 20)``
    log_y : logarithmic y-axis (only if all finite losses are positive)
    """
    y = np.asarray(losses, dtype=float).ravel()
    if y.size == 0:
        raise ValueError("losses is empty: nothing to plot")
    if window is None:
        window = max(1, y.size // 20)
    if window < 1:
        raise ValueError(f"window must be positive; got {window}")
    x = np.arange(1, y.size + 1)
    fig, (ax,) = _new_figure(1, panel_size=(6.0, 4.0))
    ax.plot(x, y, linewidth=0.8, alpha=0.4, color="tab:blue", label="loss")
    if window > 1:
        ax.plot(
            x,
            _smooth(y, window),
            linewidth=1.8,
            color="tab:blue",
            label=f"moving average ({window})",
        )
    finite = y[np.isfinite(y)]
    if log_y and finite.size and np.all(finite > 0):
        ax.set_yscale("log")
    if finite.size:
        ax.set_title(f"{title} (last = {finite[-1]:.4g}, min = {finite.min():.4g})")
    else:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, path)


def latency_vs_batch(
    latencies: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike[str],
    title: str = "Latency per batch",
) -> Path:
    """Log-log latency (ms per batch) against batch size, one line per predictor."""
    _require_nonempty(latencies, "latencies")
    fig, (ax,) = _new_figure(1, panel_size=(6.5, 4.5))
    for name, by_batch in latencies.items():
        batches = sorted(by_batch)
        ax.plot(batches, [by_batch[b] for b in batches], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per batch")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, path)


# --------------------------------------------------------------------------- series (CSV)
def _write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write ``rows`` under ``header`` atomically; ``None`` and non-finite numbers become empty cells (gaps)."""
    import csv
    import io
    import math

    def cell(value: Any) -> Any:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return ""
        return repr(value) if isinstance(value, float) else value

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(value) for value in row] for row in rows)
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buffer.getvalue())
    return Path(path)


def fidelity_series(ratios: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike[str],
                    points: int = 101) -> Path:
    """Quantile functions of the per-logit variance ratio PFP / Monte-Carlo as CSV: ``quantile`` on a
    fixed grid over [0, 1], one column ``OPTION_SET`` per option and set (from the fidelity report)."""
    _require_nonempty(ratios, "ratios")
    grid = np.linspace(0.0, 1.0, points)
    columns = {f"{option}_{name}": np.quantile(np.asarray(values, dtype=float), grid)
               for option, per_set in ratios.items() for name, values in per_set.items()}
    rows = [[float(q), *(float(columns[c][i]) for c in columns)] for i, q in enumerate(grid)]
    return _write_csv(path, ["quantile", *columns], rows)


def roc_series(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | os.PathLike[str],
    points: int = ROC_GRID_POINTS,
) -> Path:
    """ROC curves as CSV: ``fpr`` on a fixed grid, one true-positive-rate column per curve.

    Parameters
    ----------
    curves : mapping column name -> (fpr, tpr, auc), as for :func:`roc_curves`
    path : output CSV path
    points : grid points on [0, 1]; each curve's TPR is its step curve's upper envelope there
    """
    _require_nonempty(curves, "curves")
    if points < 2:
        raise ValueError(f"points must be at least 2; got {points}")
    grid = np.linspace(0.0, 1.0, points)
    columns = {}
    for name, (fpr, tpr, _auc) in curves.items():
        fpr = np.asarray(fpr, dtype=float)
        tpr = np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
            raise ValueError(f"curves[{name!r}]: fpr {fpr.shape} and tpr {tpr.shape} must be equal non-empty 1-D shapes")
        if np.any(np.diff(fpr) < 0):
            raise ValueError(f"curves[{name!r}]: fpr must be non-decreasing")
        # the highest TPR reached at each grid FPR (a vertical ROC step counts at its top)
        last = np.searchsorted(fpr, grid, side="right") - 1
        columns[name] = np.where(last >= 0, tpr[np.maximum(last, 0)], 0.0)
    rows = [[float(x), *(float(columns[name][i]) for name in columns)] for i, x in enumerate(grid)]
    return _write_csv(path, ["fpr", *columns], rows)


def reliability_series(bins_by_method: Mapping[str, ReliabilityBins], path: str | os.PathLike[str]) -> Path:
    """Reliability diagrams as CSV: per confidence bin (its centre), per method accuracy, mean confidence, count.

    Empty bins have empty accuracy/confidence cells (no point drawn). ``ideal`` is the diagonal.
    """
    _require_nonempty(bins_by_method, "bins_by_method")
    edges = None
    for method, rb in bins_by_method.items():
        these = np.asarray(rb.edges, dtype=float)
        if edges is None:
            edges = these
        elif these.shape != edges.shape or not np.allclose(these, edges):
            raise ValueError(f"bins_by_method[{method!r}]: bin edges differ from the other methods'")
    assert edges is not None
    centres = (edges[:-1] + edges[1:]) / 2
    header = ["confidence", "ideal"]
    for method in bins_by_method:
        header += [f"{method}_accuracy", f"{method}_confidence", f"{method}_count"]
    rows = []
    for i, centre in enumerate(centres):
        row: list[Any] = [float(centre), float(centre)]
        for rb in bins_by_method.values():
            count = int(np.asarray(rb.counts)[i])
            row += [float(rb.accuracy[i]) if count else None, float(rb.confidence[i]) if count else None, count]
        rows.append(row)
    return _write_csv(path, header, rows)


def loss_series(losses: Sequence[float] | np.ndarray, path: str | os.PathLike[str], x: str = "epoch",
                y: str = "elbo_loss") -> Path:
    """A loss curve as CSV: ``x`` (1, 2, ...) and ``y``; non-finite losses are empty cells."""
    values = np.asarray(losses, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("losses is empty: nothing to write")
    return _write_csv(path, [x, y], [[i + 1, float(v)] for i, v in enumerate(values)])
