"""Does `trl-laser fit-row`'s cross-validated choice hold on problems it did not choose on? Training problems only.

`fit-row` picks the ridge and the between-problem weight whose out-of-fold scores rank best on the fitting samples
(`row_fit.choice`), then reports that cell's cross-validated AUROCs. Picking the best of 32 cells on a few hundred
problems is itself a fit: its figures are optimistic, and the smallest ridges may win on noise. This script nests the
choice: each outer fold of problems is scored by a row whose ridge and weight were chosen by cross-validation on the
other folds alone, with each choice rule, so the pooled outer figures are what the rule delivers on problems it never
saw. All of it runs on what `fit-row --save-states` saved (the fitting samples of *training* problems): nothing is
sampled, and the held-out split is never read.

    python benchmarks/row_fit_selection.py outputs/miniature_seed2/laser_row_only_no_mix_fit_states.pt

Writes the rules' outer figures, each outer fold's choices and the plain cross-validation table to
`benchmarks/results/row_fit_selection.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trl_laser.data import make_arithmetic_dataset
from trl_laser.evaluation.summary import ranking
from trl_laser.readout import grouped_folds
from trl_laser.row_fit import (
    DEFAULT_BETWEEN_WEIGHTS,
    DEFAULT_RIDGES,
    choice,
    choice_value,
    cross_validate_row_fit,
    load_fitting_states,
    refitted_logps,
    row_fit_step,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEAR_BEST = 0.01  # `larger_ridge`: the largest ridge whose mean AUROC is within this of the best cell's


def larger_ridge(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cell with the largest ridge among those within `NEAR_BEST` of the best mean AUROC (ties: the best mean):
    a smaller ridge must earn its extra freedom by more than the noise of the estimate."""
    best = choice_value(choice(table))
    near = [row for row in table if choice_value(row) >= best - NEAR_BEST]
    return max(near, key=lambda row: (row["ridge"], choice_value(row)))


def within_only(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cell that ranks best within a problem, what best-of-N and weighted voting need."""
    return max(table, key=lambda row: -1.0 if row["auroc_within_problem"] is None else row["auroc_within_problem"])


RULES: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "mean (fit-row's)": choice,
    "within only": within_only,
    "larger ridge": larger_ridge,
}


def nested_selection(
    fitting: dict[str, Any],
    rules: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]],
    ridges: Sequence[float] = DEFAULT_RIDGES,
    between_weights: Sequence[float] = DEFAULT_BETWEEN_WEIGHTS,
    outer_folds: int = 5,
    inner_folds: int = 5,
    seed: int = 0,
    bands: Sequence[str] | None = None,
    train_mask: torch.Tensor | None = None,
) -> dict[str, dict[str, Any]]:
    """Per rule: the pooled outer AUROC overall and within a problem (and per band, given each sample's), and each
    outer fold's chosen cell.

    Each outer fold (grouped by problem, stratified) is scored by the row fitted on the other folds with the cell the
    rule picks from `cross_validate_row_fit` run on those other folds only (`inner_folds`). With `train_mask`, only
    the other folds' samples it marks train: the outer folds stay those of all samples, so two calls pair on the same
    problems (a fit on fewer problems against one on all).
    """
    states, logps, labels, groups = fitting["states"], fitting["logps"], fitting["labels"], fitting["groups"]
    beta, ref, other = fitting["beta"], fitting["ref"], fitting.get("other_gram")
    label_list, group_list = labels.bool().tolist(), groups.tolist()
    fold_of = torch.tensor(grouped_folds(group_list, outer_folds, seed, label_list))
    scores = {name: torch.empty(len(labels), dtype=torch.float64) for name in rules}
    chosen: dict[str, list[dict[str, float]]] = {name: [] for name in rules}
    for k in range(outer_folds):
        train, test = fold_of != k, fold_of == k
        if train_mask is not None:
            train = train & train_mask
        inner_labels = [y for y, t in zip(label_list, train.tolist()) if t]
        inner_groups = [g for g, t in zip(group_list, train.tolist()) if t]
        table = cross_validate_row_fit(
            states[train],
            logps[train],
            inner_labels,
            inner_groups,
            beta,
            ref,
            ridges,
            between_weights,
            inner_folds,
            seed,
            other,
        )
        for name, rule in rules.items():
            cell = rule(table)
            step = row_fit_step(
                states[train], logps[train], labels[train], groups[train], beta, ref, cell["ridge"],
                cell["between_weight"], other,
            )  # fmt: skip
            scores[name][test] = refitted_logps(states[test], logps[test], step)
            chosen[name].append({"ridge": cell["ridge"], "between_weight": cell["between_weight"]})
    results = {}
    for name in rules:
        rank = ranking(scores[name].tolist(), label_list, group_list)
        results[name] = {
            "auroc": rank["auroc"],
            "auroc_within_problem": rank["auroc_within_problem"],
            "chosen": chosen[name],
        }
        if bands is not None:
            results[name]["by_band"] = band_rankings(scores[name].tolist(), label_list, group_list, bands)
    return results


def mixed_problems(labels: Sequence[bool], groups: Sequence[int]) -> set[int]:
    """The problems with both right and wrong answers: the only ones a within-problem ranking pairs."""
    return {g for g, y in zip(groups, labels) if y} & {g for g, y in zip(groups, labels) if not y}


def band_rankings(
    scores: Sequence[float], labels: Sequence[bool], groups: Sequence[int], bands: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per difficulty band: its problems, those with right and wrong answers, and the AUROC within a problem."""
    out = {}
    for band in dict.fromkeys(bands):
        rows = [i for i, b in enumerate(bands) if b == band]
        band_groups, band_labels = [groups[i] for i in rows], [labels[i] for i in rows]
        rank = ranking([scores[i] for i in rows], band_labels, band_groups)
        out[band] = {
            "problems": len(set(band_groups)),
            "problems_with_both_classes": len(mixed_problems(band_labels, band_groups)),
            "auroc_within_problem": rank["auroc_within_problem"],
        }
    return out


def free_by_band(
    fitting: dict[str, Any], labels: Sequence[bool], groups: Sequence[int], bands: Sequence[str] | None
) -> dict[str, dict[str, Any]] | None:
    """The mean token log-prob's `band_rankings`, for states files that hold it (`fit-row` since 2026-12-04)."""
    if bands is None or "mean_token_logprobs" not in fitting:
        return None
    return band_rankings(fitting["mean_token_logprobs"].tolist(), labels, groups, bands)


def arithmetic_bands(groups: Sequence[int], split: str, num_problems: int) -> list[str]:
    """Each sample's band, for states fitted on the first `num_problems` of a `builtin:arithmetic` split: the
    states hold problem ids in the order of first appearance, which the generated split reproduces."""
    data = make_arithmetic_dataset(split).select(range(num_problems))
    band_of = dict(zip(data["problem"], data["difficulty"]))
    texts = list(band_of)
    if len(texts) != len(set(groups)):
        raise ValueError(
            f"The states hold {len(set(groups))} problems, the first {num_problems} of {split!r} {len(texts)} texts: "
            "give the split and --max-problems the fit used."
        )
    return [band_of[texts[g]] for g in groups]


def first_problems(groups: torch.Tensor, num_problems: int) -> torch.Tensor:
    """Which samples belong to the first `num_problems` problems (in the order they were sampled)."""
    keep = list(dict.fromkeys(groups.tolist()))[:num_problems]
    return torch.isin(groups, torch.tensor(keep))


def subset(fitting: dict[str, Any], num_problems: int) -> dict[str, Any]:
    """The fitting samples of the first `num_problems` problems (in the order they were sampled)."""
    mask = first_problems(fitting["groups"], num_problems)
    per_sample = [key for key in ("states", "logps", "labels", "groups", "mean_token_logprobs") if key in fitting]
    return {**fitting, **{key: fitting[key][mask] for key in per_sample}}


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ridges` and `--between-weights`, fit-row's grid by default: a run over another grid pairs with one over the
    default on the same outer folds (here), or refits a model over it (`refit_from_states.py`)."""
    parser.add_argument(
        "--ridges", type=float, nargs="+", default=list(DEFAULT_RIDGES), help="Ridges to choose from (fit-row's)."
    )
    parser.add_argument(
        "--between-weights",
        type=float,
        nargs="+",
        default=list(DEFAULT_BETWEEN_WEIGHTS),
        help="Between-problem weights in (0, 1] to choose from (fit-row's).",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("states", help="A file written by `trl-laser fit-row --save-states`.")
    parser.add_argument("--outer-folds", type=int, default=5, help="Outer folds, grouped by problem.")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[64, 128, 192],
        help="Also nest fit-row's rule on the first N problems only, for each N (how the fit grows with problems).",
    )
    parser.add_argument(
        "--paired-size",
        type=int,
        default=None,
        help="Also score the same outer folds by fit-row's rule trained only on their other folds' problems among the "
        "first N: a fit on N problems against one on all, paired on the same held-out problems.",
    )
    parser.add_argument(
        "--arithmetic-split",
        default=None,
        help="The builtin:arithmetic split the fit sampled (train, train_distinct): also report each band.",
    )
    parser.add_argument(
        "--max-problems", type=int, default=None, help="With --arithmetic-split: the problems the fit sampled."
    )
    add_grid_arguments(parser)
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "results", "row_fit_selection.json"), help="JSON file."
    )
    return parser


def main(args: argparse.Namespace) -> None:
    fitting = load_fitting_states(args.states)
    labels, groups = fitting["labels"].bool().tolist(), fitting["groups"].tolist()
    before = ranking(fitting["logps"].tolist(), labels, groups)
    bands = None
    if args.arithmetic_split is not None:
        bands = arithmetic_bands(groups, args.arithmetic_split, args.max_problems)
    grid = {"ridges": args.ridges, "between_weights": args.between_weights}
    table = cross_validate_row_fit(
        fitting["states"], fitting["logps"], labels, groups, fitting["beta"], fitting["ref"], **grid,
        folds=fitting["folds"], seed=fitting["seed"], other_gram=fitting["other_gram"],
    )  # fmt: skip
    rules = nested_selection(
        fitting, RULES, **grid, outer_folds=args.outer_folds, inner_folds=fitting["folds"], bands=bands
    )
    curve = {}
    for size in args.sizes:
        nested = nested_selection(subset(fitting, size), {"mean": choice}, **grid, outer_folds=args.outer_folds)
        curve[str(size)] = {key: nested["mean"][key] for key in ("auroc", "auroc_within_problem")}
    paired = None
    if args.paired_size is not None:
        mask = first_problems(fitting["groups"], args.paired_size)
        nested = nested_selection(
            fitting,
            {"mean": choice},
            **grid,
            outer_folds=args.outer_folds,
            inner_folds=fitting["folds"],
            train_mask=mask,
        )["mean"]
        paired = {
            "size": args.paired_size,
            **{key: nested[key] for key in ("auroc", "auroc_within_problem", "chosen")},
        }
    mixed = len(mixed_problems(labels, groups))
    results = {
        "states": args.states,
        "n_samples": len(labels),
        "n_problems": len(set(groups)),
        "n_problems_with_both_classes": mixed,
        "grid": grid,
        "before_fit": {"auroc": before["auroc"], "auroc_within_problem": before["auroc_within_problem"]},
        "cross_validation": {"chosen": choice(table), "table": table},
        "nested": rules,
        "nested_by_problems": curve,
        "nested_paired_first_problems": paired,
        "command": shlex.join(["python", "benchmarks/row_fit_selection.py", *sys.argv[1:]]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    cv = results["cross_validation"]["chosen"]
    print(f"{results['n_problems']} problems, {mixed} with right and wrong answers, {len(labels)} samples")
    print(
        f"fit-row's cross-validated figures of its choice: AUROC {cv['auroc']:.3f}, within {cv['auroc_within_problem']:.3f}"
    )
    print("| rule | outer AUROC | outer within a problem | chosen (ridge, between weight) per outer fold |")
    print("|---|---|---|---|")
    for name, r in rules.items():
        cells = ", ".join(f"({c['ridge']:g}, {c['between_weight']:g})" for c in r["chosen"])
        print(f"| {name} | {r['auroc']:.3f} | {r['auroc_within_problem']:.3f} | {cells} |")
    for band, r in (rules["mean (fit-row's)"].get("by_band") or {}).items():
        print(
            f"fit-row's rule, {band}: within {r['auroc_within_problem']} over {r['problems_with_both_classes']} of "
            f"{r['problems']} problems with both classes"
        )
    for size, r in curve.items():
        print(
            f"fit-row's rule on the first {size} problems: outer AUROC {r['auroc']:.3f}, within {r['auroc_within_problem']:.3f}"
        )
    if paired is not None:
        print(
            f"fit-row's rule trained on the first {paired['size']} problems only, the same outer folds: outer AUROC "
            f"{paired['auroc']:.3f}, within {paired['auroc_within_problem']:.3f}"
        )
    print(f"[row_fit_selection] wrote {args.output}")


if __name__ == "__main__":
    main(make_parser().parse_args())
