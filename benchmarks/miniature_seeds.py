"""The miniature over training seeds: each arm's held-out figures per seed, their mean, and the accuracy goal on it.

One run of `benchmarks/miniature.py` trains every arm on one seed (its `--train-seed`, else the recipes' `seed`), and
runs of GRPO's loss differ by a few points of accuracy from seed to seed. This script sets the runs' results files side
by side, so that the accuracy goal of issue 17 (LaSeR not below GRPO by more than 2 points) is judged on the mean over
seeds, each seed's GRPO beside the same seed's LaSeR arm:

    python benchmarks/miniature_seeds.py benchmarks/results/miniature_ranking.json \\
        benchmarks/results/miniature_seed1.json --arms grpo,laser_row_only_no_mix_fit

It trains nothing: rerun the files' own commands (in each file's `command`) to reproduce them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The held-out figures compared per seed, with their labels.
COLUMNS = {
    "accuracy": "accuracy",
    "auroc_within_problem": "within problem",
    "within_mean_token_logprob": "within (mean lp)",
    "majority_at_n": "majority@N",
    "weighted_at_n": "weighted@N",
    "best_of_n": "best-of-N",
    "auroc": "AUROC",
}
ACCURACY_MARGIN = 0.02  # the goal: accuracy not below GRPO's by more than 2 points


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="Results files of benchmarks/miniature.py, one per training seed.")
    parser.add_argument("--arms", default="grpo,laser_row_only_no_mix_fit", help="Comma-separated arms to compare.")
    parser.add_argument("--baseline", default="grpo", help="The arm whose accuracy the others are held to.")
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "results", "miniature_seeds.json"), help="JSON file."
    )
    return parser


def training_seed(entry: dict[str, Any]) -> int:
    """The seed an arm was trained with: recorded by `--train-seed` runs, else the recipe's own."""
    train = entry["train"]
    if train.get("seed") is not None:
        return int(train["seed"])
    with open(os.path.join(ROOT, train["recipe"]), encoding="utf-8") as f:
        return int(yaml.safe_load(f)["seed"])


def seed_rows(runs: Sequence[dict[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (arm, seed) found in the runs: the seed and the held-out figures of `COLUMNS`."""
    rows = []
    for run in runs:
        for arm in arms:
            entry = run["arms"].get(arm)
            if entry is None:
                continue
            free = entry["baselines"]["mean_token_logprob"]["auroc_within_problem"]
            values = {**{key: entry.get(key) for key in COLUMNS}, "within_mean_token_logprob": free}
            rows.append({"arm": arm, "seed": training_seed(entry), **values})
    return rows


def mean_rows(rows: Sequence[dict[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    """Per arm, the mean of each figure over its seeds (None where a seed has none)."""
    means = []
    for arm in arms:
        own = [r for r in rows if r["arm"] == arm]
        if not own:
            continue
        mean = {"arm": arm, "seed": "mean", "n_seeds": len(own)}
        for key in COLUMNS:
            values = [r[key] for r in own]
            mean[key] = None if any(v is None for v in values) else statistics.fmean(values)
        means.append(mean)
    return means


def accuracy_goal(rows: Sequence[dict[str, Any]], arm: str, baseline: str) -> dict[str, Any]:
    """The accuracy goal on seeds both arms ran: per-seed and mean differences, and whether the mean meets it."""
    accuracy = {(r["arm"], r["seed"]): r["accuracy"] for r in rows}
    seeds = sorted({s for a, s in accuracy if a == arm} & {s for a, s in accuracy if a == baseline})
    differences = {seed: accuracy[arm, seed] - accuracy[baseline, seed] for seed in seeds}
    mean = statistics.fmean(differences.values()) if differences else None
    return {
        "seeds": seeds,
        "difference_by_seed": differences,
        "mean_difference": mean,
        "met": mean is not None and mean >= -ACCURACY_MARGIN,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["arm", "seed", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["n/a" if row[k] is None else f"{row[k]:.3f}" for k in COLUMNS]
        lines.append("| " + " | ".join([f"`{row['arm']}`", str(row["seed"]), *cells]) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    runs = []
    for path in args.results:
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    rows = seed_rows(runs, arms)
    means = mean_rows(rows, arms)
    goals = {arm: accuracy_goal(rows, arm, args.baseline) for arm in arms if arm != args.baseline}
    results = {
        "files": [os.path.relpath(os.path.abspath(p), ROOT) for p in args.results],
        "commands": [run.get("command") for run in runs],
        "rows": rows,
        "means": means,
        "accuracy_goal": goals,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(format_table([*rows, *means]))
    for arm, goal in goals.items():
        gaps = ", ".join(f"seed {s}: {d:+.3f}" for s, d in goal["difference_by_seed"].items())
        verdict = "met" if goal["met"] else "not met"
        mean = "n/a" if goal["mean_difference"] is None else f"{goal['mean_difference']:+.3f}"
        print(f"{arm} - {args.baseline} accuracy: {gaps}; mean {mean} (goal >= -{ACCURACY_MARGIN}: {verdict})")
    print(f"[miniature_seeds] wrote {args.output}")


if __name__ == "__main__":
    main(make_parser().parse_args())
