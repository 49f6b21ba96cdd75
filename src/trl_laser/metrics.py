"""Self-verification metrics of a score against 0/1 correctness (`docs/method.md`, "Metrics").

Shared by the trainer's logs and the evaluation report, so that training and test time report the same numbers.
A metric that is undefined on its input (AUROC with a single class, the paper's F1 with an empty class) is `None`,
never a made-up value and never NaN, so that it serialises to JSON `null`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence


def _clean(scores: Sequence[float | None], labels: Sequence[bool | int]) -> tuple[list[float], list[int]]:
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels must have the same length, got {len(scores)} and {len(labels)}")
    pairs = [(float(s), int(bool(y))) for s, y in zip(scores, labels) if s is not None and not math.isnan(float(s))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ranked_pairs(s: Sequence[float], y: Sequence[int]) -> tuple[float, int]:
    """(correct, incorrect) pairs ranked right (ties 1/2) and the number of pairs: rank-based Mann-Whitney U."""
    n_pos = sum(y)
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        return 0.0, 0
    # Average ranks for ties: O(n log n).
    order = sorted(range(len(s)), key=lambda i: s[i])
    ranks = [0.0] * len(s)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, t in zip(ranks, y) if t)
    return rank_sum - n_pos * (n_pos + 1) / 2, n_pos * n_neg


def auroc(scores: Sequence[float | None], labels: Sequence[bool | int]) -> float | None:
    """Probability that a random correct sample scores above a random incorrect one (ties count 1/2).

    Rows with a `None` score are ignored; `None` if either class is empty.
    """
    right, pairs = _ranked_pairs(*_clean(scores, labels))
    return right / pairs if pairs else None


def _pairs_by_group(
    scores: Sequence[float | None], labels: Sequence[bool | int], groups: Sequence[Hashable]
) -> dict[Hashable, tuple[float, int]]:
    """(pairs ranked right, pairs) of each group that has both classes among its scored rows."""
    _clean(scores, labels)  # checks the lengths
    if len(groups) != len(scores):
        raise ValueError(f"scores and groups must have the same length, got {len(scores)} and {len(groups)}")
    by_group: dict[Hashable, tuple[list, list]] = {}
    for score, label, group in zip(scores, labels, groups):
        rows = by_group.setdefault(group, ([], []))
        rows[0].append(score)
        rows[1].append(label)
    counts = {group: _ranked_pairs(*_clean(*rows)) for group, rows in by_group.items()}
    return {group: count for group, count in counts.items() if count[1]}


def auroc_within_group(
    scores: Sequence[float | None], labels: Sequence[bool | int], groups: Sequence[Hashable]
) -> float | None:
    """The AUROC over (correct, incorrect) pairs of the same group only (ties 1/2), pooled over all groups.

    With groups = problems this asks "among the samples of one problem, does the score put the right ones first?",
    which a score that only knows how hard a problem is cannot do (it ranks problems, not answers). Pairs are pooled,
    so a group weighs by its number of pairs. Rows with a `None` score are ignored; `None` if no group has both classes.
    """
    return _pooled(_pairs_by_group(scores, labels, groups).values())


def _pooled(counts: Iterable[tuple[float, int]]) -> float | None:
    """The AUROC of (pairs ranked right, pairs) counts pooled over groups; `None` without a pair."""
    right, pairs = 0.0, 0
    for r, p in counts:
        right, pairs = right + r, pairs + p
    return right / pairs if pairs else None


def within_group_intervals(
    signals: Mapping[str, Sequence[float | None]],
    labels: Sequence[bool | int],
    groups: Sequence[Hashable],
    draws: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """How far the within-group AUROC of each signal can be trusted: percentile bootstrap intervals that resample the
    groups with both classes (a group's pairs move together: its answers share one problem), for each signal and for
    the first signal's lead over each other one. With 30 such groups the intervals are about 0.35 wide, wider than
    most differences between signals: a within-problem comparison needs them beside it.

    Returns `groups` and `pairs` (of the first signal), and per signal its `auroc`, `interval`, and (after the first)
    `lead_interval`, of the first signal's AUROC minus this one's; intervals are `None` when no group has both classes.
    """
    if not signals:
        raise ValueError("`signals` must name at least one signal")
    if draws < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"`draws` must be >= 1 and `level` in (0, 1), got {draws} and {level}")
    counts = {name: _pairs_by_group(scores, labels, groups) for name, scores in signals.items()}
    first = next(iter(signals))
    mixed = sorted(counts[first], key=str)
    rng = random.Random(seed)
    resampled: dict[str, list[float]] = {name: [] for name in signals}
    for _ in range(draws if mixed else 0):
        sample = [mixed[rng.randrange(len(mixed))] for _ in mixed]
        for name, by_group in counts.items():
            value = _pooled(by_group[g] for g in sample if g in by_group)
            resampled[name].append(math.nan if value is None else value)

    def interval(values: list[float]) -> list[float] | None:
        values = sorted(v for v in values if not math.isnan(v))
        if not values:
            return None
        tail = (1.0 - level) / 2
        return [values[int(tail * len(values))], values[min(len(values) - 1, int((1.0 - tail) * len(values)))]]

    out: dict = {"groups": len(mixed), "pairs": sum(p for _, p in counts[first].values()), "signals": {}}
    for name in signals:
        row = {"auroc": _pooled(counts[name].values()), "interval": interval(resampled[name])}
        if name != first:
            row["lead_interval"] = interval([a - b for a, b in zip(resampled[first], resampled[name])])
        out["signals"][name] = row
    return out


def expected_calibration_error(
    scores: Sequence[float | None], labels: Sequence[bool | int], num_bins: int = 10
) -> float | None:
    """ECE over `num_bins` equal-width bins of `clamp(score, 0, 1)`; the last bin includes 1. `None` if empty."""
    s, y = _clean(scores, labels)
    if not s:
        return None
    bins: list[list[tuple[float, int]]] = [[] for _ in range(num_bins)]
    for v, t in zip(s, y):
        c = min(max(v, 0.0), 1.0)
        bins[min(int(c * num_bins), num_bins - 1)].append((c, t))
    total = 0.0
    for b in bins:
        if b:
            conf = sum(c for c, _ in b) / len(b)
            acc = sum(t for _, t in b) / len(b)
            total += len(b) * abs(acc - conf)
    return total / len(s)


def self_verification_metrics(
    scores: Sequence[float | None], labels: Sequence[bool | int], threshold: float = 0.5, num_bins: int = 10
) -> dict[str, float | int | None]:
    """All self-verification metrics of `docs/method.md` for scores r_s and correctness labels.

    A sample is predicted correct iff `score > threshold`. Samples with a `None` score (no EOS) are left out.

    Returns a dict with `n`, `n_correct`, `n_incorrect`, `sv_accuracy`, `tpr` (accuracy on correct samples), `tnr`
    (accuracy on incorrect samples), `sv_f1_paper` (`2 TPR TNR / (TPR + TNR)`, the paper's F1), `sv_f1_binary`
    (ordinary F1 of the "correct" class), `auroc` and `ece`.
    """
    s, y = _clean(scores, labels)
    pred = [v > threshold for v in s]
    tp = sum(p and t for p, t in zip(pred, y))
    tn = sum((not p) and (not t) for p, t in zip(pred, y))
    fp = sum(p and not t for p, t in zip(pred, y))
    fn = sum((not p) and t for p, t in zip(pred, y))
    n_c, n_i = tp + fn, tn + fp
    tpr = tp / n_c if n_c else None
    tnr = tn / n_i if n_i else None
    if tpr is None or tnr is None:
        f1_paper = None
    else:
        f1_paper = 2 * tpr * tnr / (tpr + tnr) if tpr + tnr > 0 else 0.0
    f1_binary = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) > 0 else None
    return {
        "n": len(s),
        "n_correct": n_c,
        "n_incorrect": n_i,
        "sv_accuracy": (tp + tn) / len(s) if s else None,
        "tpr": tpr,
        "tnr": tnr,
        "sv_f1_paper": f1_paper,
        "sv_f1_binary": f1_binary,
        "auroc": auroc(s, y),
        "ece": expected_calibration_error(s, y, num_bins=num_bins),
    }
