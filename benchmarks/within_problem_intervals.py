"""How far can a within-problem AUROC from `trl-laser eval` be trusted? Bootstrap intervals over problems.

A within-problem AUROC pools the (right, wrong) pairs of the problems that got both right and wrong answers; a policy
trained with GRPO answers most problems the same way every time, so few problems carry it (20 distinct texts among
the quickstart's 200 held-out problems x 8). This script resamples those problems, copies of one text as one
(`metrics.within_group_intervals`), and prints, for the score and each free signal, its within-problem AUROC with a
percentile interval, and the score's lead over each free signal with its own. It reads an evaluation's `samples.jsonl` and nothing else: nothing is sampled.

    python benchmarks/within_problem_intervals.py outputs/quickstart/SmolLM2-135M-Instruct-LaSeR-arithmetic-fit-eval/samples.jsonl
"""

from __future__ import annotations

import argparse
import json

from trl_laser.evaluation.summary import BASELINES, problem_groups
from trl_laser.metrics import within_group_intervals


def intervals(path: str, draws: int, level: float, seed: int) -> dict:
    """The score's and the free signals' within-problem intervals over the scored samples of one evaluation."""
    with open(path, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    scored = [s for s in samples if s.get("self_reward") is not None]
    signals = {"self_reward": [s["self_reward"] for s in scored]}
    signals.update({key: [s.get(key) for s in scored] for key in BASELINES if any(key in s for s in scored)})
    labels = [bool(s["correct"]) for s in scored]
    problems = problem_groups(scored)
    result = within_group_intervals(signals, labels, problems, draws=draws, level=level, seed=seed)
    return {"samples": path, "n_scored": len(scored), "draws": draws, "level": level, "seed": seed, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", nargs="+", help="one or more `samples.jsonl` files written by `trl-laser eval`")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps([intervals(path, args.draws, args.level, args.seed) for path in args.samples], indent=1))


if __name__ == "__main__":
    main()
