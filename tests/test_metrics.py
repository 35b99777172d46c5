"""Hand-computed checks for ``pfp.metrics``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pfp import metrics as M

# --------------------------------------------------------------------------- fixture
# Four examples, three classes:
#   row  probs               label  argmax  correct  confidence  p[label]
#   0    [0.70, 0.20, 0.10]  0      0       yes      0.70        0.70
#   1    [0.05, 0.65, 0.30]  2      1       no       0.65        0.30
#   2    [0.30, 0.20, 0.50]  2      2       yes      0.50        0.50
#   3    [0.90, 0.05, 0.05]  1      0       no       0.90        0.05
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.05, 0.65, 0.30],
        [0.30, 0.20, 0.50],
        [0.90, 0.05, 0.05],
    ]
)
LABELS = np.array([0, 2, 2, 1])


def test_accuracy_hand():
    # 2 of 4 correct
    assert M.accuracy(PROBS, LABELS) == pytest.approx(0.5)


def test_nll_hand():
    # -(ln .7 + ln .3 + ln .5 + ln .05) / 4
    # = (0.356675 + 1.203973 + 0.693147 + 2.995732) / 4 = 5.249527 / 4 = 1.312382
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.05)) / 4
    assert expected == pytest.approx(1.312382, abs=1e-6)
    assert M.nll(PROBS, LABELS) == pytest.approx(expected)


def test_nll_eps_clips_zero_probability():
    probs = np.array([[1.0, 0.0]])
    assert M.nll(probs, np.array([1]), eps=1e-12) == pytest.approx(-math.log(1e-12))


def test_brier_hand():
    # row 0: 0.3^2 + 0.2^2 + 0.1^2          = 0.09 + 0.04 + 0.01     = 0.140
    # row 1: 0.05^2 + 0.65^2 + (0.3-1)^2    = 0.0025 + 0.4225 + 0.49 = 0.915
    # row 2: 0.3^2 + 0.2^2 + (0.5-1)^2      = 0.09 + 0.04 + 0.25     = 0.380
    # row 3: 0.9^2 + (0.05-1)^2 + 0.05^2    = 0.81 + 0.9025 + 0.0025 = 1.715
    # mean = 3.15 / 4 = 0.7875
    assert M.brier(PROBS, LABELS) == pytest.approx(0.7875)


def test_ece_hand_5_bins():
    # bins (0.4,0.6]: row 2  -> acc 1, conf 0.5            |gap| 0.5   n=1
    #      (0.6,0.8]: rows 0,1 -> acc 0.5, conf 0.675      |gap| 0.175 n=2
    #      (0.8,1.0]: row 3  -> acc 0, conf 0.9            |gap| 0.9   n=1
    # ECE = (0.5 + 2*0.175 + 0.9) / 4 = 1.75 / 4 = 0.4375
    assert M.expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(
        0.4375
    )


def test_ece_hand_default_15_bins():
    # With 15 bins every example is alone in its bin (0.5 -> bin 7, 0.65 -> 9,
    # 0.7 -> 10, 0.9 -> 13), so ECE = mean |correct - conf|
    # = (0.5 + 0.65 + 0.3 + 0.9) / 4 = 2.35 / 4 = 0.5875
    assert M.expected_calibration_error(PROBS, LABELS) == pytest.approx(0.5875)
    rb = M.reliability_bins(PROBS, LABELS)
    assert np.flatnonzero(rb.counts).tolist() == [7, 9, 10, 13]


def test_reliability_bins_contents():
    rb = M.reliability_bins(PROBS, LABELS, n_bins=5)
    np.testing.assert_allclose(rb.edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert rb.counts.tolist() == [0, 0, 1, 2, 1]
    np.testing.assert_allclose(rb.accuracy, [0, 0, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(rb.confidence, [0, 0, 0.5, 0.675, 0.9])
    assert rb.total == 4 and rb.n_bins == 5
    np.testing.assert_allclose(rb.centers, [0.1, 0.3, 0.5, 0.7, 0.9])
    # ECE is computed from the same bins
    assert rb.ece == pytest.approx(
        M.expected_calibration_error(PROBS, LABELS, n_bins=5)
    )
    d = rb.to_dict()
    assert d["counts"] == [0, 0, 1, 2, 1] and d["ece"] == pytest.approx(0.4375)


def test_reliability_bins_edges_are_right_inclusive():
    # confidence exactly 0.6 belongs to (0.4, 0.6]; exactly 1.0 to the last bin
    probs = np.array([[0.6, 0.4], [1.0, 0.0]])
    rb = M.reliability_bins(probs, np.array([0, 0]), n_bins=5)
    assert rb.counts.tolist() == [0, 0, 1, 0, 1]


def test_perfectly_calibrated_ece_zero():
    # conf 0.75 each, 3 of 4 correct -> acc 0.75 -> ECE 0
    probs = np.tile([0.75, 0.25], (4, 1))
    labels = np.array([0, 0, 0, 1])
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.0)


# --------------------------------------------------------------------------- multi-label
# Two images with L = 3 labels each:
#   image 0: p = [0.8, 0.2], labels [0, 0, 1] -> 2 of 3 correct
#   image 1: p = [0.4, 0.6], labels [1, 1, 1] -> 3 of 3 correct
ML_PROBS = np.array([[0.8, 0.2], [0.4, 0.6]])
ML_LABELS = np.array([[0, 0, 1], [1, 1, 1]])


def test_multilabel_accuracy_nll_brier_hand():
    assert M.accuracy(ML_PROBS, ML_LABELS) == pytest.approx(5 / 6)
    expected_nll = -(2 * math.log(0.8) + math.log(0.2) + 3 * math.log(0.6)) / 6
    assert M.nll(ML_PROBS, ML_LABELS) == pytest.approx(expected_nll)
    # brier per pair: (img0,y0) 0.2^2+0.2^2 = 0.08; (img0,y1) 0.8^2+0.8^2 = 1.28;
    # (img1,y1) 0.4^2+0.4^2 = 0.32 -> (2*0.08 + 1.28 + 3*0.32) / 6 = 2.4 / 6 = 0.4
    assert M.brier(ML_PROBS, ML_LABELS) == pytest.approx(0.4)
    # ECE (5 bins): conf 0.8 (bin (0.6,0.8]) acc 2/3; conf 0.6 (bin (0.4,0.6]) acc 1
    # -> (3*|2/3-0.8| + 3*|1-0.6|) / 6 = (0.4 + 1.2) / 6 = 0.266667
    assert M.expected_calibration_error(ML_PROBS, ML_LABELS, n_bins=5) == pytest.approx(
        1.6 / 6
    )


def test_multilabel_equals_explicit_expansion():
    probs_rep = np.repeat(ML_PROBS, 3, axis=0)
    labels_flat = ML_LABELS.reshape(-1)
    for fn in (M.accuracy, M.nll, M.brier, M.expected_calibration_error):
        assert fn(ML_PROBS, ML_LABELS) == pytest.approx(fn(probs_rep, labels_flat))
    p, y = M.expand_labels(ML_PROBS, ML_LABELS)
    assert p.shape == (6, 2) and y.tolist() == [0, 0, 1, 1, 1, 1]


def test_single_column_multilabel_matches_1d():
    assert M.nll(PROBS, LABELS[:, None]) == pytest.approx(M.nll(PROBS, LABELS))


# --------------------------------------------------------------------------- uncertainty
def test_entropy_values():
    # H([0.25, 0.75]) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    h = M.entropy(np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]))
    np.testing.assert_allclose(h, [math.log(2), 0.0, 0.562335], atol=1e-6)
    np.testing.assert_allclose(M.entropy(np.full((1, 4), 0.25)), [math.log(4)])


def test_softmax_entropy_is_entropy_of_mean():
    sp = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, N=1, C=2)
    np.testing.assert_allclose(M.softmax_entropy(sp), [math.log(2)])
    np.testing.assert_allclose(M.softmax_entropy(np.array([[0.5, 0.5]])), [math.log(2)])


def test_mi_zero_when_samples_agree():
    row = np.array([0.2, 0.5, 0.3])
    sp = np.broadcast_to(row, (7, 4, 3)).copy()
    mi = M.mutual_information(sp)
    assert mi.shape == (4,)
    np.testing.assert_allclose(mi, 0.0, atol=1e-12)
    assert np.all(mi >= 0)  # clamped even with round-off


def test_mi_log2_for_confident_disagreement():
    # sample 1 says class 0, sample 2 says class 1: H[mean] = log 2, mean H = 0
    sp = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(M.mutual_information(sp), [math.log(2)])


def test_mi_hand_partial():
    # samples [0.9,0.1] and [0.5,0.5]: mean [0.7,0.3]
    # H[mean] = -(.7 ln .7 + .3 ln .3) = 0.610864
    # mean H  = (0.325083 + 0.693147) / 2 = 0.509115 -> MI = 0.101749
    sp = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    def h(p):
        return -sum(x * math.log(x) for x in p)

    expected = h([0.7, 0.3]) - (h([0.9, 0.1]) + h([0.5, 0.5])) / 2
    assert expected == pytest.approx(0.101749, abs=1e-6)
    np.testing.assert_allclose(M.mutual_information(sp), [expected])


# --------------------------------------------------------------------------- AUROC
def _pairwise_auroc(s_in, s_out):
    """P(score_out > score_in) + 0.5 P(tie), by counting all pairs."""
    total = 0.0
    for o in s_out:
        for i in s_in:
            total += 1.0 if o > i else (0.5 if o == i else 0.0)
    return total / (len(s_in) * len(s_out))


def test_auroc_hand_pairwise():
    s_in = np.array([0.1, 0.4, 0.35])
    s_out = np.array([0.8, 0.4, 0.3])
    # out 0.8 beats 3 in; out 0.4 beats 0.1, 0.35 and ties 0.4 -> 2.5; out 0.3 beats 0.1 -> 1
    # AUROC = (3 + 2.5 + 1) / 9 = 6.5 / 9
    assert _pairwise_auroc(s_in, s_out) == pytest.approx(6.5 / 9)
    assert M.auroc(s_in, s_out) == pytest.approx(6.5 / 9)


def test_auroc_matches_sklearn_and_pairwise_random():
    rng = np.random.default_rng(0)
    s_in = np.round(rng.normal(0.0, 1.0, 40), 1)  # rounding makes ties
    s_out = np.round(rng.normal(0.7, 1.0, 30), 1)
    y = np.r_[np.zeros(40), np.ones(30)]
    ref = roc_auc_score(y, np.r_[s_in, s_out])
    assert M.auroc(s_in, s_out) == pytest.approx(ref)
    assert M.auroc(s_in, s_out) == pytest.approx(_pairwise_auroc(s_in, s_out))


def test_auroc_extremes():
    assert M.auroc([0.0, 0.1], [0.5, 0.9]) == pytest.approx(1.0)
    assert M.auroc([0.5, 0.9], [0.0, 0.1]) == pytest.approx(0.0)


def test_roc_curve_points():
    s_in = np.array([0.1, 0.4, 0.35])
    s_out = np.array([0.8, 0.4, 0.3])
    fpr, tpr = M.roc_curve_points(s_in, s_out)
    assert fpr.shape == tpr.shape
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(M.auroc(s_in, s_out))


# --------------------------------------------------------------------------- relative error
def test_relative_error_hand():
    # ||[3,5] - [3,4]|| / ||[3,4]|| = 1 / 5
    assert M.relative_error(
        np.array([3.0, 5.0]), np.array([3.0, 4.0])
    ) == pytest.approx(0.2)
    # Frobenius over a matrix: diff [[0,0],[0,2]], ||ref|| = sqrt(1+4+4+16) = 5 -> 0.4
    ref = np.array([[1.0, 2.0], [2.0, 4.0]])
    est = np.array([[1.0, 2.0], [2.0, 6.0]])
    assert M.relative_error(est, ref) == pytest.approx(0.4)
    assert M.relative_error(ref, ref) == 0.0


def test_relative_error_errors():
    with pytest.raises(ValueError, match="estimate shape"):
        M.relative_error(np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="zero norm"):
        M.relative_error(np.ones(3), np.zeros(3))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "fn", [M.accuracy, M.nll, M.brier, M.expected_calibration_error]
)
def test_probs_must_be_2d(fn):
    with pytest.raises(ValueError, match="probs must be 2-D"):
        fn(np.array([0.2, 0.8]), np.array([1]))


@pytest.mark.parametrize(
    "fn", [M.accuracy, M.nll, M.brier, M.expected_calibration_error]
)
def test_label_count_mismatch(fn):
    with pytest.raises(ValueError, match="labels has 3 rows but probs has 4"):
        fn(PROBS, np.array([0, 1, 2]))


@pytest.mark.parametrize("bad", [np.array([0, 1, 2, 3]), np.array([0, -1, 2, 1])])
def test_labels_out_of_range(bad):
    with pytest.raises(ValueError, match="labels out of range"):
        M.accuracy(PROBS, bad)


def test_multilabel_out_of_range():
    with pytest.raises(ValueError, match="labels out of range"):
        M.nll(ML_PROBS, np.array([[0, 2, 1], [1, 1, 1]]))


def test_bad_label_shapes_and_types():
    with pytest.raises(ValueError, match="labels must be 1-D"):
        M.accuracy(PROBS, np.zeros((4, 1, 1), dtype=int))
    with pytest.raises(ValueError, match="non-integral"):
        M.accuracy(PROBS, np.array([0.0, 1.5, 2.0, 1.0]))
    # integral floats are accepted
    assert M.accuracy(PROBS, LABELS.astype(float)) == pytest.approx(0.5)


def test_bad_probs_values():
    with pytest.raises(ValueError, match="non-finite"):
        M.nll(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="negative"):
        M.brier(np.array([[-0.1, 1.1]]), np.array([0]))
    with pytest.raises(ValueError, match="no examples"):
        M.accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        M.reliability_bins(PROBS, LABELS, n_bins=0)


def test_mi_requires_3d():
    with pytest.raises(ValueError, match="sample_probs must be 3-D"):
        M.mutual_information(PROBS)


def test_auroc_bad_scores():
    with pytest.raises(ValueError, match="scores_in must be 1-D"):
        M.auroc(np.zeros((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match="scores_out is empty"):
        M.auroc(np.zeros(3), np.array([]))
    with pytest.raises(ValueError, match="scores_out contains non-finite"):
        M.roc_curve_points(np.zeros(3), np.array([np.inf]))
