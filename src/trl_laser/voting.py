"""Answer aggregation over N samples of one problem: majority vote, self-reward-weighted vote, best-of-N.

Answers are grouped by mathematical equivalence with math-verify (`0.5`, `\\frac{1}{2}` and `\\boxed{1/2}` are one
answer), as `docs/method.md` ("Metrics") requires; a sample without an answer (`None`) takes part in no vote.
Every tie is broken by first appearance, so results are deterministic; over randomly ordered samples that is a
uniformly random tie-break.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from .answers import answers_equivalent


@dataclasses.dataclass
class Vote:
    """The winning answer of a vote and the samples behind it."""

    answer: str  # the answer as the first sample of the group gave it
    index: int  # that first sample's index: read its correctness to score the vote
    members: list[int]  # indices of all samples with an equivalent answer
    weight: float  # the group's size (majority) or its sum of clamp(r_s, 0, 1) (weighted)


@functools.lru_cache(maxsize=262144)
def _equivalent(a: str, b: str) -> bool:
    """Cached, because inference-time scaling curves re-vote the same answers over many subsets."""
    return a == b or answers_equivalent(a, b)


def group_answers(answers: Sequence[str | None]) -> list[list[int]]:
    """Indices of the samples grouped by equivalent answers, groups in order of first appearance.

    Each sample joins the first group whose first answer is equivalent to its own; `None` answers are left out.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if _equivalent(str(answers[group[0]]), str(answer)):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def answer_agreement(answers: Sequence[str | None]) -> list[float]:
    """For each sample, the fraction of the other samples of its problem with an equivalent answer.

    A free confidence signal (self-consistency): an answer many samples reach is more often right. A sample without
    an answer agrees with nothing (0.0), and with a single sample there is nobody to agree with (0.0).
    """
    agreement = [0.0] * len(answers)
    if len(answers) < 2:
        return agreement
    for group in group_answers(answers):
        for i in group:
            agreement[i] = (len(group) - 1) / (len(answers) - 1)
    return agreement


def clamp_score(score: float | None) -> float:
    """clamp(r_s, 0, 1), the weight of a sample in the weighted vote; 0 for an unscored (truncated) sample."""
    return 0.0 if score is None else min(max(float(score), 0.0), 1.0)


def _winner(answers: Sequence[str | None], weights: Sequence[float]) -> Vote | None:
    best = None
    for group in group_answers(answers):
        weight = sum(weights[i] for i in group)
        # Heavier wins; equal weights: the larger group, then the earlier one.
        if best is None or (weight, len(group)) > (best.weight, len(best.members)):
            best = Vote(answer=str(answers[group[0]]), index=group[0], members=group, weight=weight)
    return best


def majority_vote(answers: Sequence[str | None]) -> Vote | None:
    """The answer given by the most samples; `None` when no sample has an answer."""
    return _winner(answers, [1.0] * len(answers))


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float | None]) -> Vote | None:
    """The answer with the largest sum of clamp(r_s, 0, 1) over its samples; `None` when no sample has an answer.

    Equal weights (e.g. all zero) fall back to the larger group, then to the earlier one.
    """
    if len(answers) != len(scores):
        raise ValueError(f"answers and scores must have the same length, got {len(answers)} and {len(scores)}.")
    return _winner(answers, [clamp_score(s) for s in scores])


def best_of_n(scores: Sequence[float | None]) -> int | None:
    """Index of the sample with the highest r_s (unscored samples rank last); `None` only for no samples."""
    if not scores:
        return None
    return max(range(len(scores)), key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i))


def accuracy(correct: Sequence[bool | int | None]) -> float | None:
    """Fraction of true values; `None` (not 0) for no values, so that an empty subset is not reported as wrong."""
    return sum(bool(c) for c in correct) / len(correct) if correct else None


def vote_correctness(
    answers: Sequence[str | None], scores: Sequence[float | None], correct: Sequence[bool]
) -> dict[str, bool]:
    """Whether majority vote, weighted vote and best-of-N are right on one problem (no answer counts as wrong)."""
    majority = majority_vote(answers)
    weighted = weighted_vote(answers, scores)
    best = best_of_n(scores)
    return {
        "majority": majority is not None and bool(correct[majority.index]),
        "weighted": weighted is not None and bool(correct[weighted.index]),
        "best_of_n": best is not None and bool(correct[best]),
    }
