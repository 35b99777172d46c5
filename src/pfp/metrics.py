"""Evaluation metrics for predictive distributions (pure numpy functions).

Conventions
-----------
``probs``
    ``(N, C)`` predictive probabilities, i.e. the mean over samples for SVI or the
    approximated ``E[softmax(z)]`` for PFP. Rows are not required to sum to one
    exactly (approximations need not), but they must be finite and non-negative.
``sample_probs``
    ``(S, N, C)`` per-sample softmax outputs.
``labels``
    Integer class indices, either ``(N,)`` or multi-label ``(N, L)``. Ambiguous
    data carries ``L`` labels per image; label-based metrics then average over all
    ``N * L`` (image, label) pairs, implemented by repeating each probability row
    ``L`` times.

Definitions follow ``docs/pfp-notes.md`` section 4: accuracy, NLL, Brier (sum over
classes, mean over examples), ECE with 15 equal-width confidence bins, softmax
entropy ``SME = H[p_bar]``, mutual information ``MI = H[p_bar] - E_s[H[p_s]]`` and
OOD AUROC with the out-of-distribution set as the positive class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "auroc",
    "brier",
    "entropy",
    "expand_labels",
    "expected_calibration_error",
    "mutual_information",
    "nll",
    "relative_error",
    "reliability_bins",
    "roc_curve_points",
    "softmax_entropy",
]


# --------------------------------------------------------------------------- helpers
def _as_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    """Validate a ``(N, C)`` probability array and return it as float64."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C); got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one class column; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} contains negative values")
    return arr


def _as_sample_probs(
    sample_probs: np.ndarray, name: str = "sample_probs"
) -> np.ndarray:
    """Validate a ``(S, N, C)`` per-sample probability array and return it as float64."""
    arr = np.asarray(sample_probs, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 3-D (S, N, C); got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise ValueError(
            f"{name} needs at least one sample and one class; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} contains negative values")
    return arr


def _as_labels(labels: np.ndarray, n_examples: int, n_classes: int) -> np.ndarray:
    """Validate ``(N,)`` or ``(N, L)`` integer labels and return them as int64."""
    arr = np.asarray(labels)
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"labels must be 1-D (N,) or 2-D (N, L); got shape {arr.shape}"
        )
    if arr.shape[0] != n_examples:
        raise ValueError(
            f"labels has {arr.shape[0]} rows but probs has {n_examples} examples "
            f"(labels shape {arr.shape})"
        )
    if arr.ndim == 2 and arr.shape[1] < 1:
        raise ValueError(
            f"multi-label labels need at least one label per example; got {arr.shape}"
        )
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"labels must be integer class indices; got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and (
        not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
    ):
        raise ValueError(
            "labels must be integer class indices; got non-integral values"
        )
    out = arr.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= n_classes):
        raise ValueError(
            f"labels out of range: expected values in [0, {n_classes - 1}], "
            f"got min {out.min()} and max {out.max()}"
        )
    return out


def expand_labels(
    probs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (possibly multi-label) labels into one (probability row, label) per pair.

    Parameters
    ----------
    probs : (N, C) array
    labels : (N,) or (N, L) int array

    Returns
    -------
    probs_pairs : (N * L, C) float64 array (row ``i`` repeated ``L`` times)
    labels_pairs : (N * L,) int64 array
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    if y.ndim == 1:
        return p, y
    n_labels = y.shape[1]
    return np.repeat(p, n_labels, axis=0), y.reshape(-1)


def _check_nonempty(p: np.ndarray) -> None:
    if p.shape[0] == 0:
        raise ValueError("probs has no examples (N = 0)")


# --------------------------------------------------------------------------- label metrics
def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (image, label) pairs whose label equals ``argmax(probs)``."""
    p, y = expand_labels(probs, labels)
    _check_nonempty(p)
    return float(np.mean(np.argmax(p, axis=1) == y))


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log p[label]`` (probabilities clipped at ``eps``)."""
    p, y = expand_labels(probs, labels)
    _check_nonempty(p)
    picked = p[np.arange(p.shape[0]), y]
    return float(-np.mean(np.log(np.clip(picked, eps, None))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Brier score: sum over classes of ``(p - onehot)^2``, mean over examples."""
    p, y = expand_labels(probs, labels)
    _check_nonempty(p)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin calibration statistics on max-probability confidence.

    Bins are equal-width on ``[0, 1]`` and right-inclusive, ``(lo, hi]`` (a
    confidence of exactly 0 falls into the first bin). Empty bins have
    ``count == 0`` and ``accuracy == confidence == 0``.

    Attributes
    ----------
    edges : (n_bins + 1,) bin edges
    accuracy : (n_bins,) fraction correct per bin
    confidence : (n_bins,) mean confidence per bin
    counts : (n_bins,) number of (image, label) pairs per bin
    """

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    @property
    def ece(self) -> float:
        """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|``."""
        total = self.total
        if total == 0:
            return 0.0
        weights = self.counts / total
        return float(np.sum(weights * np.abs(self.accuracy - self.confidence)))

    def to_dict(self) -> dict[str, list[float] | list[int] | float]:
        """JSON-friendly representation."""
        return {
            "edges": self.edges.tolist(),
            "accuracy": self.accuracy.tolist(),
            "confidence": self.confidence.tolist(),
            "counts": self.counts.astype(int).tolist(),
            "ece": self.ece,
        }


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> ReliabilityBins:
    """Bin (image, label) pairs by confidence ``max(probs)`` into ``n_bins`` equal-width bins.

    Returns
    -------
    ReliabilityBins
        Edges, per-bin accuracy, mean confidence and counts.
    """
    if (
        isinstance(n_bins, bool)
        or not isinstance(n_bins, (int, np.integer))
        or n_bins < 1
    ):
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    n_bins = int(n_bins)
    p, y = expand_labels(probs, labels)
    _check_nonempty(p)
    conf = np.max(p, axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-inclusive bins (lo, hi]; values <= 0 go to bin 0, values > 1 to the last bin
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    safe = np.maximum(counts, 1)
    acc = np.where(counts > 0, acc_sum / safe, 0.0)
    mean_conf = np.where(counts > 0, conf_sum / safe, 0.0)
    return ReliabilityBins(
        edges=edges, accuracy=acc, confidence=mean_conf, counts=counts
    )


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> float:
    """ECE: count-weighted mean of ``|accuracy - confidence|`` over equal-width bins."""
    return reliability_bins(probs, labels, n_bins=n_bins).ece


# --------------------------------------------------------------------------- uncertainty
def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (natural log) along the last axis; ``0 log 0 = 0``.

    Parameters
    ----------
    probs : (..., C) array

    Returns
    -------
    (...,) float64 array
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1:
        raise ValueError(f"probs must have a class axis; got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains non-finite values")
    if np.any(p < 0):
        raise ValueError("probs contains negative values")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -np.sum(terms, axis=-1)


def softmax_entropy(probs: np.ndarray) -> np.ndarray:
    """Softmax entropy ``SME = H[p_bar]`` per example.

    Parameters
    ----------
    probs : (N, C) predictive probabilities, or (S, N, C) per-sample
        probabilities (averaged over ``S`` first).

    Returns
    -------
    (N,) float64 array
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 3:
        p_bar = _as_sample_probs(arr, "probs").mean(axis=0)
    else:
        p_bar = _as_probs(arr)
    return entropy(p_bar)


def mutual_information(sample_probs: np.ndarray) -> np.ndarray:
    """Mutual information ``H[mean_s p_s] - mean_s H[p_s]`` per example, clamped at 0.

    Parameters
    ----------
    sample_probs : (S, N, C) array

    Returns
    -------
    (N,) float64 array
    """
    sp = _as_sample_probs(sample_probs)
    mi = entropy(sp.mean(axis=0)) - entropy(sp).mean(axis=0)
    return np.maximum(mi, 0.0)


# --------------------------------------------------------------------------- OOD detection
def _ood_scores(
    scores_in: np.ndarray, scores_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s_in = np.asarray(scores_in, dtype=np.float64)
    s_out = np.asarray(scores_out, dtype=np.float64)
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {s.shape}")
        if s.size == 0:
            raise ValueError(f"{name} is empty")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} contains non-finite values")
    y_true = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    return y_true, np.concatenate([s_in, s_out])


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC for separating OOD (positive class) from in-distribution by a score.

    Higher scores must mean "more likely OOD" (e.g. MI, SME, logit variance).
    """
    from sklearn.metrics import roc_auc_score

    y_true, y_score = _ood_scores(scores_in, scores_out)
    return float(roc_auc_score(y_true, y_score))


def roc_curve_points(
    scores_in: np.ndarray, scores_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (false-positive rate, true-positive rate) with OOD as the positive class."""
    from sklearn.metrics import roc_curve

    y_true, y_score = _ood_scores(scores_in, scores_out)
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return fpr, tpr


# --------------------------------------------------------------------------- moment comparison
def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Relative Frobenius error ``||estimate - reference|| / ||reference||``.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite input or a zero-norm ``reference``.
    """
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape:
        raise ValueError(
            f"estimate shape {est.shape} does not match reference shape {ref.shape}"
        )
    for name, arr in (("estimate", est), ("reference", ref)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values")
    ref_norm = float(np.linalg.norm(ref.ravel()))
    if ref_norm == 0.0:
        raise ValueError("reference has zero norm; relative error is undefined")
    return float(np.linalg.norm((est - ref).ravel()) / ref_norm)
