"""What the graded samples say: accuracy, votes at N, self-verification, how well each signal ranks right above
wrong (overall, within a problem, per difficulty band), inference-time scaling, and the paper's table.

Everything here is a pure function of sample records (the lines of `samples.jsonl`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from ..data import ARITHMETIC_DIFFICULTIES
from ..metrics import auroc, auroc_within_group, self_verification_metrics, within_group_intervals
from ..voting import accuracy, answer_agreement, group_answers, vote_correctness


VOTE_KEYS = ("majority", "weighted", "best_of_n")
# The same votes with exp(mean token log-prob) in place of r_s, in the scaling curves beside LaSeR's.
LOGPROB_VOTE_KEYS = {"weighted": "weighted_mean_token_logprob", "best_of_n": "best_of_n_mean_token_logprob"}
_VOTE_SUMMARY_KEYS = {"majority": "majority_at_n", "weighted": "weighted_at_n", "best_of_n": "best_of_n"}
SUMMARY_KEYS = (
    "n_problems",
    "n_samples",
    "accuracy",
    "majority_at_n",
    "weighted_at_n",
    "best_of_n",
    "sv_accuracy",
    "sv_f1_paper",
    "sv_f1_binary",
    "auroc",
    "ece",
)
# Free confidence signals of every sample, reported beside the LaSeR score: what a score that costs training must beat.
BASELINES = ("mean_token_logprob", "min_token_logprob", "answer_agreement")
# The metrics of the paper's table, with their labels there.
TABLE_METRICS = {
    "accuracy": "Accuracy",
    "sv_f1_paper": "Self-verification F1",
    "auroc": "AUROC",
    "ece": "ECE",
}


def _by_problem(records: Sequence[dict]) -> list[list[dict]]:
    problems: dict[int, list[dict]] = {}
    for record in records:
        problems.setdefault(record["problem_index"], []).append(record)
    return [sorted(rows, key=lambda r: r["sample_index"]) for _, rows in sorted(problems.items())]


def problem_groups(records: Sequence[dict]) -> list[int]:
    """Each record's problem for grouping, by the problem's text: a problem set may hold one problem twice (the first
    256 training problems of `builtin:arithmetic` hold 196 texts, its 200 test problems 110). Copies are one problem:
    in folds, a copy in another fold would credit a fit for recognising the problem (on the miniature's seed-2 model,
    grouping by position chose the smallest ridge and cross-validated 0.905 within a problem; grouped by text, the
    largest, at 0.878); in a bootstrap over problems, copies drawn as independent problems narrow the intervals."""
    ids: dict[str, int] = {}
    return [ids.setdefault(r["problem"], len(ids)) for r in records]


def add_answer_agreement(records: Sequence[dict]) -> None:
    """Set each record's `answer_agreement` (the other samples of its problem with an equivalent answer)."""
    for rows in _by_problem(records):
        for row, agreement in zip(rows, answer_agreement([r["pred"] for r in rows])):
            row["answer_agreement"] = agreement


def _votes(rows: Sequence[dict]) -> dict[str, bool]:
    return vote_correctness([r["pred"] for r in rows], [r["self_reward"] for r in rows], [r["correct"] for r in rows])


def summarize_subset(records: Sequence[dict], num_problems: int) -> dict[str, Any]:
    """Accuracy, votes at N and self-verification metrics of `records` (problems without records count as wrong).

    `baselines` ranks the same samples by the free confidence signals (`BASELINES`), on exactly the samples that
    have a LaSeR score, so that each `auroc` there compares with the top-level one sample for sample.
    """
    votes = [_votes(rows) for rows in _by_problem(records)]
    sv = self_verification_metrics([r["self_reward"] for r in records], [r["correct"] for r in records])
    scores = {True: [], False: []}
    for r in records:
        if r["self_reward"] is not None:
            scores[bool(r["correct"])].append(r["self_reward"])
    scored = [r for r in records if r["self_reward"] is not None]
    # Within a problem: every pair of right and wrong answers to one problem text, across the copies of a repeated one.
    labels, problems = [r["correct"] for r in scored], problem_groups(scored)
    bands = [r.get("difficulty") for r in scored]
    names = band_names(r.get("difficulty") for r in records)
    laser = ranking([r["self_reward"] for r in scored], labels, problems, bands, names)
    baselines = {key: ranking([r.get(key) for r in scored], labels, problems, bands, names) for key in BASELINES}
    # The mean token log-prob as a voting weight: exp() of it is the geometric-mean token probability, in [0, 1].
    confidence = [_vote_confidence(rows) for rows in _by_problem(records)]
    baselines["mean_token_logprob"]["weighted_at_n"] = _rate(confidence, "weighted", num_problems)
    baselines["mean_token_logprob"]["best_of_n"] = _rate(confidence, "best_of_n", num_problems)
    reference = baselines["mean_token_logprob"]["auroc"]
    return {
        "n_problems": num_problems,
        "n_samples": len(records),
        "n_finished": sum(bool(r["finished"]) for r in records),
        "n_answered": sum(r["pred"] is not None for r in records),
        "accuracy": accuracy([r["correct"] for r in records]),
        **{name: _rate(votes, key, num_problems) for key, name in _VOTE_SUMMARY_KEYS.items()},
        **{k: sv[k] for k in ("sv_accuracy", "sv_f1_paper", "sv_f1_binary", "auroc", "ece", "tpr", "tnr")},
        "n_scored": sv["n"],
        "mean_self_reward_correct": sum(scores[True]) / len(scores[True]) if scores[True] else None,
        "mean_self_reward_incorrect": sum(scores[False]) / len(scores[False]) if scores[False] else None,
        "auroc_within_problem": laser["auroc_within_problem"],
        "within_problem_uncertainty": within_problem_uncertainty(scored, labels, problems),
        "auroc_by_band": laser["auroc_by_band"],
        "baselines": baselines,
        "laser_vs_mean_token_logprob_auroc": None if None in (sv["auroc"], reference) else sv["auroc"] - reference,
    }


UNCERTAINTY_DRAWS, UNCERTAINTY_LEVEL = 2000, 0.95  # `within_problem_uncertainty`'s bootstrap


def within_problem_uncertainty(scored: Sequence[dict], labels: Sequence[bool], problems: Sequence[Hashable]) -> dict:
    """How many problems carry the within-problem AUROC (those with right and wrong answers), and 95% bootstrap
    intervals over them (`metrics.within_group_intervals`, 2,000 draws, seed 0) for the score's AUROC and its lead
    over the mean token log-prob: a policy that answers most problems the same way leaves few, and the intervals say
    whether a within-problem difference means anything."""
    signals = {
        "self_reward": [r["self_reward"] for r in scored],
        "mean_token_logprob": [r.get("mean_token_logprob") for r in scored],
    }
    result = within_group_intervals(signals, labels, problems, draws=UNCERTAINTY_DRAWS, level=UNCERTAINTY_LEVEL)
    return {
        "problems": result["groups"],
        "pairs": result["pairs"],
        "level": UNCERTAINTY_LEVEL,
        "auroc_interval": result["signals"]["self_reward"]["interval"],
        "lead_over_mean_token_logprob_interval": result["signals"]["mean_token_logprob"]["lead_interval"],
    }


def band_names(difficulties: Iterable[str | None]) -> list[str] | None:
    """The difficulty bands present, easiest first for the built-in names, others after them alphabetically.

    `None` when no sample has a difficulty (a dataset without that column).
    """
    known = list(ARITHMETIC_DIFFICULTIES)
    present = {d for d in difficulties if d is not None}
    if not present:
        return None
    return sorted(present, key=lambda d: (known.index(d) if d in known else len(known), str(d)))


def ranking(
    scores: Sequence[float | None],
    labels: Sequence[bool],
    problems: Sequence[Hashable],
    bands: Sequence[str | None] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How well one signal ranks right above wrong: AUROC overall, within a problem, and within each band.

    Within a problem, a signal cannot profit from knowing that a problem is hard; within a band, only a little.
    `names` are the bands to report, in order (default: `band_names(bands)`); `auroc_by_band` is `None` without
    bands, and a band with one class only (or no sample) has AUROC `None`. Rows with a `None` score are left out.
    """
    names = band_names(bands or []) if names is None else names
    by_band = None
    if bands is not None and names is not None:
        by_band = {
            name: auroc(
                [s for s, b in zip(scores, bands) if b == name], [y for y, b in zip(labels, bands) if b == name]
            )
            for name in names
        }
    return {
        "auroc": auroc(scores, labels),
        "auroc_within_problem": auroc_within_group(scores, labels, problems),
        "auroc_by_band": by_band,
    }


def auroc_null_std(labels: Sequence[bool | int]) -> float | None:
    """The std of the AUROC of a score unrelated to correctness (Mann-Whitney U under the null); None for one class."""
    n_correct = sum(bool(y) for y in labels)
    n_incorrect = len(labels) - n_correct
    if not (n_correct and n_incorrect):
        return None
    return math.sqrt((len(labels) + 1) / (12 * n_correct * n_incorrect))


def _vote_confidence(rows: Sequence[dict]) -> dict[str, bool]:
    """Weighted vote and best-of-N of one problem with exp(mean token log-prob) in place of r_s."""
    weights = [None if r.get("mean_token_logprob") is None else math.exp(r["mean_token_logprob"]) for r in rows]
    return vote_correctness([r["pred"] for r in rows], weights, [r["correct"] for r in rows])


def _rate(votes: Sequence[dict[str, bool]], key: str, num_problems: int) -> float | None:
    return sum(v[key] for v in votes) / num_problems if num_problems else None


def summarize(records: Sequence[dict], num_problems: int) -> dict[str, Any]:
    """The summary over all samples, with the same metrics under `filtered` for the samples with an answer."""
    summary = summarize_subset(records, num_problems)
    summary["filtered"] = summarize_subset([r for r in records if r["pred"] is not None], num_problems)
    return summary


def scaling_curves(
    records: Sequence[dict], num_samples: int, num_subsets: int = 16, seed: int = 0
) -> dict[str, list[float | None]]:
    """Accuracy of each vote with k = 1..N samples per problem, averaged over `num_subsets` random k-subsets.

    Answers are grouped once over all N samples of a problem, so each subset's vote only counts (no re-verifying).
    `sample_accuracy` is the plain per-sample accuracy, the same for every k (the expected accuracy of one sample).
    `weighted_mean_token_logprob` and `best_of_n_mean_token_logprob` vote on the same subsets with the free signal.
    """
    rng = random.Random(seed)
    problems = []
    for rows in _by_problem(records):
        canonical: list[str | None] = [None] * len(rows)
        for group in group_answers([r["pred"] for r in rows]):
            for i in group:
                canonical[i] = rows[group[0]]["pred"]
        problems.append([dict(r, pred=a) for r, a in zip(rows, canonical)])
    keys = (*VOTE_KEYS, *LOGPROB_VOTE_KEYS.values())
    curves: dict[str, list[float | None]] = {"k": list(range(1, num_samples + 1)), **{k: [] for k in keys}}
    for k in curves["k"]:
        totals = dict.fromkeys(keys, 0.0)
        count = 0
        for _ in range(num_subsets if k < num_samples else 1):
            for rows in problems:
                # A random subset in random order (votes break ties by order, so at random); all N samples in their
                # own order, so that the curve ends at the summary's value.
                subset = rows if k >= len(rows) else [rows[i] for i in rng.sample(range(len(rows)), k)]
                for key, ok in _votes(subset).items():
                    totals[key] += ok
                for key, ok in _vote_confidence(subset).items():
                    if key in LOGPROB_VOTE_KEYS:
                        totals[LOGPROB_VOTE_KEYS[key]] += ok
                count += 1
        for key in keys:
            curves[key].append(totals[key] / count if count else None)
    curves["sample_accuracy"] = [accuracy([r["correct"] for r in records])] * num_samples
    return curves


def paper_table(summaries: dict[str, dict], num_samples: dict[str, int]) -> dict[str, Any]:
    """Per benchmark accuracy, self-verification F1 (the paper's), AUROC and ECE, and their plain average.

    The average of a metric is over all benchmarks (as the paper's "Avg."), `None` if one of them has none. As the
    official code, the F1 of a benchmark whose samples are all right or all wrong (one class empty) is 0.0, not
    undefined; `sv_f1_paper_undefined` says where that convention applied.
    """
    rows = {
        name: {
            "n": num_samples[name],
            "n_problems": s["n_problems"],
            "n_samples": s["n_samples"],
            **{key: s.get(key) for key in TABLE_METRICS},
            "sv_f1_paper_undefined": s.get("sv_f1_paper") is None,
        }
        for name, s in summaries.items()
    }
    for row in rows.values():
        if row["sv_f1_paper_undefined"]:
            row["sv_f1_paper"] = 0.0
    average = {}
    for key in TABLE_METRICS:
        values = [row[key] for row in rows.values()]
        average[key] = None if None in values or not values else sum(values) / len(values)
    return {"benchmarks": rows, "average": average}
