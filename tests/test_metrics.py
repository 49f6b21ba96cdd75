"""Self-verification metrics and accuracy against hand computations, degenerate inputs included."""

from __future__ import annotations

import pytest

from trl_laser.metrics import auroc, expected_calibration_error, self_verification_metrics
from trl_laser.voting import accuracy


def test_all_metrics_on_a_hand_worked_example():
    # The None score (a truncated completion) is left out: s = [.9, .7, .2, .6, .1], y = [1, 1, 1, 0, 0].
    # Predicted correct iff r_s > 0.5: [1, 1, 0, 1, 0] -> TP 2, FN 1, FP 1, TN 1.
    m = self_verification_metrics([0.9, 0.7, 0.2, 0.6, None, 0.1], [1, 1, 1, 0, 1, 0])
    assert (m["n"], m["n_correct"], m["n_incorrect"]) == (5, 3, 2)
    assert m["sv_accuracy"] == pytest.approx(3 / 5)
    assert m["tpr"] == pytest.approx(2 / 3)
    assert m["tnr"] == pytest.approx(1 / 2)
    assert m["sv_f1_paper"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert m["sv_f1_binary"] == pytest.approx(2 / 3)  # 2 TP / (2 TP + FP + FN) = 4 / 6
    # Pairs (correct, incorrect) ranked right: .9>.6 .9>.1 .7>.6 .7>.1 .2>.1, and .2<.6 wrong -> 5/6.
    assert m["auroc"] == pytest.approx(5 / 6)
    # One sample per bin: |1-.9| + |1-.7| + |1-.2| + |0-.6| + |0-.1| = 1.9 over 5.
    assert m["ece"] == pytest.approx(0.38)


def test_threshold_is_strict_and_ties_count_half():
    m = self_verification_metrics([0.5, 0.5], [1, 0])
    assert m["tpr"] == 0.0 and m["tnr"] == 1.0  # 0.5 is not > 0.5: predicted incorrect
    assert m["sv_f1_paper"] == 0.0  # defined (both classes present), and zero
    assert m["sv_f1_binary"] == 0.0  # FN 1, no TP
    assert m["auroc"] == 0.5
    assert auroc([0.3, 0.3, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_ece_clamps_scores_to_the_unit_interval():
    # 1.7 -> 1.0 in the last bin, right: error 0. -0.3 and -0.2 -> 0.0 in the first bin, one right: confidence 0,
    # accuracy 1/2, weight 2/3.
    assert expected_calibration_error([1.7, -0.3, -0.2], [1, 1, 0]) == pytest.approx(0.5 * 2 / 3)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        # all correct, all predicted correct: no incorrect class -> TNR, paper F1 and AUROC undefined
        ([0.9, 0.8], [1, 1], {"sv_accuracy": 1.0, "tpr": 1.0, "tnr": None, "sv_f1_paper": None, "sv_f1_binary": 1.0}),
        # all wrong, all predicted wrong: binary F1 has no positive at all -> undefined
        ([0.1, 0.2], [0, 0], {"sv_accuracy": 1.0, "tpr": None, "tnr": 1.0, "sv_f1_paper": None, "sv_f1_binary": None}),
        # all wrong, all predicted correct
        ([0.9, 0.6], [0, 0], {"sv_accuracy": 0.0, "tnr": 0.0, "sv_f1_binary": 0.0}),
        # a single sample
        ([0.7], [1], {"n": 1, "sv_accuracy": 1.0, "tpr": 1.0, "auroc": None, "ece": pytest.approx(0.3)}),
        # no scored sample (all truncated)
        ([None, None], [1, 0], {"n": 0, "sv_accuracy": None, "auroc": None, "ece": None, "sv_f1_binary": None}),
        ([], [], {"n": 0, "sv_accuracy": None, "tpr": None, "tnr": None, "ece": None}),
    ],
)
def test_degenerate_inputs_give_none_not_nan(scores, labels, expected):
    m = self_verification_metrics(scores, labels)
    for key, value in expected.items():
        assert m[key] == value, key
    if len(set(labels)) < 2:
        assert m["auroc"] is None


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same length"):
        self_verification_metrics([0.1, 0.2], [1])


def test_accuracy():
    assert accuracy([True, False, True]) == pytest.approx(2 / 3)
    assert accuracy([1, 1]) == 1.0
    assert accuracy([False]) == 0.0
    assert accuracy([]) is None
