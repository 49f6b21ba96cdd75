"""Majority vote, self-reward-weighted vote and best-of-N against hand computations, equivalent answers grouped."""

from __future__ import annotations

import pytest

from trl_laser.voting import (
    answer_agreement,
    best_of_n,
    clamp_score,
    group_answers,
    majority_vote,
    vote_correctness,
    weighted_vote,
)


HALF = ["0.5", "\\frac{1}{2}", "\\boxed{1/2}"]


def test_equivalent_answers_form_one_group():
    assert group_answers([*HALF, "1/3", None, "2", "\\frac{2}{4}"]) == [[0, 1, 2, 6], [3], [5]]
    assert group_answers([None, None]) == []
    assert group_answers([]) == []


def test_majority_vote_counts_equivalent_answers_together():
    # "3" appears twice, the three spellings of 1/2 three times: 1/2 wins though no single string is most frequent.
    vote = majority_vote(["3", "\\frac{1}{2}", "0.5", "3", "\\boxed{1/2}"])
    assert (vote.answer, vote.index, vote.members, vote.weight) == ("\\frac{1}{2}", 1, [1, 2, 4], 3.0)


def test_majority_vote_ties_and_empty():
    assert majority_vote(["7", "8"]).answer == "7"  # tie: first appearance
    assert majority_vote(["8", None, "7", "7"]).answer == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["5"]).index == 0  # a single sample


def test_weighted_vote_sums_clamped_scores():
    answers = ["3", "3", "3", "0.5", "\\frac12"]
    scores = [0.1, 0.2, None, 0.9, 1.7]
    # "3": 0.1 + 0.2 + 0 (truncated) = 0.3; 1/2: 0.9 + clamp(1.7) = 1.9. Majority would pick "3".
    vote = weighted_vote(answers, scores)
    assert vote.answer == "0.5" and vote.members == [3, 4] and vote.weight == pytest.approx(1.9)
    assert majority_vote(answers).answer == "3"
    # Negative scores weigh nothing: 0 + 0 against 0.25.
    assert weighted_vote(["1", "1", "2"], [-3.0, -0.5, 0.25]).answer == "2"


def test_weighted_vote_ties_fall_back_to_counts_then_order():
    # 0.5 against 0.25 + 0.25: equal weights, the larger group wins.
    assert weighted_vote(["2", "5", "5"], [0.5, 0.25, 0.25]).answer == "5"
    # No usable score at all: the plain majority.
    assert weighted_vote(["2", "5", "5"], [None, -1.0, None]).answer == "5"
    # Equal weight and size: the first.
    assert weighted_vote(["2", "5"], [0.4, 0.4]).answer == "2"
    assert weighted_vote([None], [0.9]) is None
    with pytest.raises(ValueError, match="same length"):
        weighted_vote(["1", "2"], [0.1])


def test_best_of_n_takes_the_highest_raw_score():
    assert best_of_n([0.2, None, 0.9, 0.9]) == 2  # tie: first
    assert best_of_n([-0.5, -0.1, None]) == 1  # ranks raw r_s, not the clamped weight
    assert best_of_n([3.0, 1.5]) == 0  # above 1 still ranks higher
    assert best_of_n([None, None]) == 0  # nothing scored: the first sample
    assert best_of_n([]) is None


def test_clamp_score():
    assert [clamp_score(s) for s in (None, -0.2, 0.3, 1.4)] == [0.0, 0.0, 0.3, 1.0]


def test_vote_correctness_reads_the_winner_of_each_vote():
    answers = ["3", "3", "0.5", "\\frac{1}{2}", None]
    scores = [0.0, 0.1, 0.45, 0.45, 2.0]
    correct = [False, False, True, True, False]
    # majority: "3" (2 vs 2, first) -> wrong; weighted: 1/2 with 0.9 -> right; best-of-N: index 4 (2.0) -> wrong.
    assert vote_correctness(answers, scores, correct) == {"majority": False, "weighted": True, "best_of_n": False}
    assert vote_correctness([None], [None], [False]) == {"majority": False, "weighted": False, "best_of_n": False}


def test_answer_agreement_counts_the_other_samples():
    # "0.5", "\\frac{1}{2}" and "0.5" are one answer: each agrees with 2 of its 4 others; None agrees with nothing.
    answers = ["0.5", "\\frac{1}{2}", "2", None, "0.5"]
    assert answer_agreement(answers) == [2 / 4, 2 / 4, 0.0, 0.0, 2 / 4]
    assert answer_agreement(["7"]) == [0.0]
    assert answer_agreement([]) == []
    assert answer_agreement([None, None]) == [0.0, 0.0]
    assert answer_agreement(["3", "3"]) == [1.0, 1.0]
