"""Statistics of trainer benchmarks: step-time summaries, ratios between arms, and the identical-batch check.

Pure functions (no model, no torch), shared by `bench_overhead.py` (CPU) and `gpu.py` (GPU), so that both compare
arms the same way: ratios are of medians, and two arms are only compared when they trained on the same batches.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def summarize(values: list[float]) -> dict[str, float]:
    """Median, extremes, quartiles and interquartile range of repeated timings."""
    ordered = sorted(values)
    p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p25": p25,
        "p75": p75,
        "iqr": p75 - p25,
    }


def ratios(summary: dict[str, dict[str, Any]], pairs: dict[str, tuple[str, str]], key: str) -> dict[str, float]:
    """`summary[a][key] / summary[b][key]` for each named pair `(a, b)` whose configurations were run."""
    return {name: summary[a][key] / summary[b][key] for name, (a, b) in pairs.items() if a in summary and b in summary}


def batch_record(completion_ids: Sequence[Sequence[int]]) -> list:
    """`[token count, digest of the ids]` of one generation batch: what the identical-batch check compares."""
    digest = hashlib.sha256(json.dumps([list(ids) for ids in completion_ids]).encode()).hexdigest()[:16]
    return [sum(len(ids) for ids in completion_ids), digest]


def identical_batches(runs: dict[str, list[dict[str, Any]]], pairs: Iterable[tuple[str, str]]) -> dict[str, bool]:
    """Whether paired configurations (all their rounds) trained on the same completions, batch by batch.

    `runs[name]` holds one dict per round with a `"batches"` list of `batch_record`s.
    """
    checks = {}
    for a, b in dict.fromkeys(pairs):
        if a in runs and b in runs:
            reference = runs[b][0]["batches"]
            checks[f"{a}_vs_{b}"] = all(run["batches"] == reference for run in runs[a] + runs[b])
    return checks
