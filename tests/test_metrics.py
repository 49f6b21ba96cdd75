"""Self-verification metrics and accuracy against hand computations, degenerate inputs included."""

from __future__ import annotations

import pytest

from trl_laser.metrics import (
    auroc,
    auroc_within_group,
    expected_calibration_error,
    self_verification_metrics,
    within_group_intervals,
)
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


# ------------------------------------------------------------------------------------------ AUROC within a group
def brute_force_within_group(scores, labels, groups):
    right, pairs = 0.0, 0
    for si, yi, gi in zip(scores, labels, groups):
        for sj, yj, gj in zip(scores, labels, groups):
            if gi == gj and yi and not yj and si is not None and sj is not None:
                pairs += 1
                right += 1.0 if si > sj else 0.5 if si == sj else 0.0
    return right / pairs if pairs else None


def test_auroc_within_group_by_hand():
    # Group "a": correct .9, .4; incorrect .5 -> pairs (.9>.5) right, (.4<.5) wrong: 1 of 2.
    # Group "b": correct .1; incorrect .1, .0 -> a tie (1/2) and a right pair: 1.5 of 2.
    # Group "c": one class only, no pair. Pooled: 2.5 / 4. (Across groups .9 > .0 etc. would not count.)
    scores = [0.9, 0.4, 0.5, 0.1, 0.1, 0.0, 0.7, 0.2]
    labels = [1, 1, 0, 1, 0, 0, 1, 1]
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    assert auroc_within_group(scores, labels, groups) == pytest.approx(2.5 / 4)
    # A score that only knows the group ranks groups perfectly but nothing within one.
    by_group = [{"a": 0.9, "b": 0.1, "c": 0.5}[g] for g in groups]
    assert auroc_within_group(by_group, labels, groups) == 0.5
    # One group only: the plain AUROC. None scores are left out; no pair at all: None.
    assert auroc_within_group([0.3, 0.3, 0.8, 0.1], [1, 0, 1, 0], [0] * 4) == auroc([0.3, 0.3, 0.8, 0.1], [1, 0, 1, 0])
    assert auroc_within_group([0.9, None, 0.2], [1, 0, 0], [0, 0, 1]) is None
    assert auroc_within_group([0.9, 0.2], [1, 0], [0, 1]) is None
    assert auroc_within_group([], [], []) is None
    with pytest.raises(ValueError, match="same length"):
        auroc_within_group([0.1, 0.2], [1, 0], [0])


def test_auroc_within_group_equals_brute_force_on_a_fixed_set():
    import random

    rng = random.Random(0)
    scores = [rng.choice([None, *[round(rng.random(), 1) for _ in range(9)]]) for _ in range(200)]  # many ties
    labels = [rng.random() < 0.4 for _ in scores]
    groups = [rng.randrange(25) for _ in scores]
    expected = brute_force_within_group(scores, labels, groups)
    assert expected is not None
    assert auroc_within_group(scores, labels, groups) == pytest.approx(expected, abs=1e-12)


def test_within_group_intervals_resample_whole_groups():
    # Group "a": the score ranks its one pair right, the log-prob wrong; group "b": the reverse; group "c" has one
    # class only and takes no part. Resampling 2 groups from {a, b} gives the score 1, 1/2 or 0 (probabilities 1/4,
    # 1/2, 1/4): the 95% interval is [0, 1], the lead of the score over the log-prob (2x - 1 of it) [-1, 1].
    labels = [1, 0, 1, 0, 1, 1]
    groups = ["a", "a", "b", "b", "c", "c"]
    signals = {"score": [0.9, 0.1, 0.2, 0.8, 0.5, None], "logprob": [-2.0, -1.0, -1.0, -2.0, -1.0, -1.0]}
    out = within_group_intervals(signals, labels, groups, draws=2000, seed=1)
    assert (out["groups"], out["pairs"]) == (2, 2)
    score, logprob = out["signals"]["score"], out["signals"]["logprob"]
    assert score["auroc"] == logprob["auroc"] == pytest.approx(0.5)
    assert score["interval"] == [0.0, 1.0] and logprob["interval"] == [0.0, 1.0]
    assert logprob["lead_interval"] == [-1.0, 1.0] and "lead_interval" not in score
    # Identical groups leave nothing to resample: the interval is the value itself.
    same = within_group_intervals({"score": [0.9, 0.1, 0.8, 0.2]}, [1, 0, 1, 0], ["a", "a", "b", "b"], draws=50)
    assert same["signals"]["score"] == {"auroc": 1.0, "interval": [1.0, 1.0]}
    # No group with both classes: no interval, not a made-up one.
    none = within_group_intervals({"score": [0.9, 0.1]}, [1, 1], ["a", "b"])
    assert none["groups"] == 0 and none["signals"]["score"] == {"auroc": None, "interval": None}
    with pytest.raises(ValueError, match="`level`"):
        within_group_intervals({"score": [0.9, 0.1]}, [1, 0], ["a", "a"], level=95)
