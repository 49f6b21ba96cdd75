"""Can z_c's row rank one problem's answers better than `fit-row`'s least squares? Two studies on training samples.

Both run on what `trl-laser fit-row --save-states` saved (the EOS states, log pi(z_c), labels, problem ids and mean
token log-probs of the fitting samples of *training* problems); nothing is sampled and no held-out split is read.
Folds hold whole problems (`readout.grouped_folds`), as in `fit-row`'s cross-validation.

1. **A pairwise refinement** (issue 17's pair term, here in the fit): from `fit-row`'s row (its chosen cell), z_c's row
   moves to minimise the logistic loss `softplus(-(log pi_i - log pi_j))` over every pair of a right answer i and a
   wrong answer j to one problem, plus `strength * mean|h|^2 * |w - w_fit|^2`, which keeps it near the least-squares
   row (a large strength is that row). The out-of-fold AUROCs, overall and within a problem, per strength.
2. **The free signal in the EOS state**: a ridge regression, within problems, of the mean token log-prob (which ranks
   a problem's answers well) on the EOS states. The out-of-fold correlation of its prediction with the mean token
   log-prob, within problems, and the prediction's within-problem AUROC: how much of that free signal a linear row
   could read at all.

    python benchmarks/row_fit_objectives.py outputs/quickstart/fit_states_grpo_distinct256.pt

Writes `benchmarks/results/row_fit_objectives.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from trl_laser.evaluation.summary import ranking
from trl_laser.readout import grouped_folds
from trl_laser.row_fit import choice, cross_validate_row_fit, load_fitting_states, refitted_logps, row_fit_step


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRENGTHS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # x mean|h|^2 (about 2,000 for SmolLM2-135M)
READOUT_RIDGES = (0.001, 0.01, 0.1, 1.0, 10.0)


def within_pairs(labels: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (right, wrong) of every pair of a right and a wrong answer to the same problem."""
    same = groups[:, None] == groups[None, :]
    right, wrong = (same & (labels[:, None] > 0.5) & (labels[None, :] <= 0.5)).nonzero(as_tuple=True)
    return right, wrong


def pair_loss(logps: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """The mean logistic loss of the pairs' log pi(z_c) differences (0 pairs: 0)."""
    if right.numel() == 0:
        return logps.sum() * 0.0
    return torch.nn.functional.softplus(logps[wrong] - logps[right]).mean()


def pair_refined_step(
    states: torch.Tensor,
    logps: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    start: torch.Tensor,
    strength: float,
    max_iter: int = 200,
) -> torch.Tensor:
    """The row change minimising `pair_loss` + `strength * mean|h|^2 * |step - start|^2`, from `start` (L-BFGS)."""
    states, logps, start = states.double(), logps.double(), start.double()
    right, wrong = within_pairs(labels, groups)
    scale = states.pow(2).sum(1).mean()
    step = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([step], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = pair_loss(refitted_logps(states, logps, step), right, wrong)
        loss = loss + strength * scale * (step - start).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return step.detach()


def cross_validate_pair(
    fitting: dict[str, Any], strengths: Sequence[float], folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Out-of-fold AUROCs of `fit-row`'s row (its chosen cell, refitted in each fold) and of its pairwise refinement
    at each strength."""
    states, logps, labels, groups = fitting["states"], fitting["logps"], fitting["labels"], fitting["groups"]
    beta, ref = fitting["beta"], fitting["ref"]
    label_list, group_list = labels.bool().tolist(), groups.tolist()
    cell = choice(cross_validate_row_fit(states, logps, label_list, group_list, beta, ref, folds=folds, seed=seed))
    fold_of = torch.tensor(grouped_folds(group_list, folds, seed, label_list))
    scores = {s: torch.empty(len(labels), dtype=torch.float64) for s in (None, *strengths)}
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        start = row_fit_step(
            states[train], logps[train], labels[train], groups[train], beta, ref, cell["ridge"], cell["between_weight"]
        )
        scores[None][test] = refitted_logps(states[test], logps[test], start)
        for strength in strengths:
            step = pair_refined_step(states[train], logps[train], labels[train], groups[train], start, strength)
            scores[strength][test] = refitted_logps(states[test], logps[test], step)
    rows = []
    for strength, values in scores.items():
        rank = ranking(values.tolist(), label_list, group_list)
        rows.append(
            {"strength": strength, "auroc": rank["auroc"], "auroc_within_problem": rank["auroc_within_problem"]}
        )
    return {"fit_row_cell": {"ridge": cell["ridge"], "between_weight": cell["between_weight"]}, "table": rows}


def centred(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each row minus the mean of its group's rows."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    counts = torch.zeros(len(ids), dtype=values.dtype).index_add_(
        0, inverse, torch.ones_like(inverse, dtype=values.dtype)
    )
    sums = torch.zeros((len(ids), *values.shape[1:]), dtype=values.dtype).index_add_(0, inverse, values)
    return values - (sums / counts.view(-1, *[1] * (values.dim() - 1)))[inverse]


def free_signal_readout(
    fitting: dict[str, Any], ridges: Sequence[float], folds: int = 5, seed: int = 0
) -> list[dict[str, float | None]]:
    """Per ridge (relative to trace / d): the out-of-fold within-problem correlation of a linear read-out of the EOS
    states with the mean token log-prob, and that read-out's within-problem AUROC."""
    states, labels, groups = fitting["states"].double(), fitting["labels"], fitting["groups"]
    free = fitting["mean_token_logprobs"].double()
    label_list, group_list = labels.bool().tolist(), groups.tolist()
    fold_of = torch.tensor(grouped_folds(group_list, folds, seed, label_list))
    rows = []
    for ridge in ridges:
        predicted = torch.empty(len(labels), dtype=torch.float64)
        for k in range(folds):
            train, test = fold_of != k, fold_of == k
            x, y = centred(states[train], groups[train]), centred(free[train], groups[train])
            gram = x.T @ x
            damping = ridge * torch.trace(gram) / gram.size(0)
            weights = torch.linalg.solve(gram + damping * torch.eye(gram.size(0), dtype=gram.dtype), x.T @ y)
            predicted[test] = states[test] @ weights
        both = torch.stack([centred(predicted, groups), centred(free, groups)])
        rows.append(
            {
                "ridge": ridge,
                "within_problem_correlation": float(torch.corrcoef(both)[0, 1]),
                "auroc_within_problem": ranking(predicted.tolist(), label_list, group_list)["auroc_within_problem"],
            }
        )
    return rows


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "states", help="A file written by `trl-laser fit-row --save-states` (with mean token log-probs)."
    )
    parser.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS), help="Pairwise refinements.")
    parser.add_argument("--ridges", type=float, nargs="+", default=list(READOUT_RIDGES), help="Read-out ridges.")
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "results", "row_fit_objectives.json"), help="JSON file."
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    fitting = load_fitting_states(args.states)
    if "mean_token_logprobs" not in fitting:
        raise SystemExit(f"{args.states} holds no mean token log-probs (fit-row saves them since 2026-12-04).")
    label_list, group_list = fitting["labels"].bool().tolist(), fitting["groups"].tolist()
    free = ranking(fitting["mean_token_logprobs"].tolist(), label_list, group_list)
    result = {
        "states": args.states,
        "samples": len(label_list),
        "problems": len(set(group_list)),
        "mean_token_logprob": {"auroc": free["auroc"], "auroc_within_problem": free["auroc_within_problem"]},
        "pairwise_refinement": cross_validate_pair(fitting, args.strengths),
        "free_signal_readout": free_signal_readout(fitting, args.ridges),
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(make_parser().parse_args())
