"""Refit a trained model's z_c row from what `trl-laser fit-row --save-states` saved, over another grid: no sampling.

`fit-row` chooses its (ridge, between weight) cell by cross-validation over a grid, grouped by problem, then moves
z_c's row by that cell's step (`row_fit.cross_validate_row_fit`, `choice`, `row_fit_step`). This reruns the choice
and the step on the saved fitting samples with the grid given, and saves the model as `fit-row` saves it (z_c
suppressed in its generation config, the same self-reward settings), so that a grid chosen on training samples
(`benchmarks/row_fit_selection.py --ridges ...`) can be evaluated once on held-out problems by `trl-laser eval`
without sampling the fit again. With `fit-row`'s own grid the row is `fit-row`'s.

    python benchmarks/refit_from_states.py --model outputs/quickstart/MODEL \
        --states outputs/quickstart/fit_states_seed42_distinct512.pt --output-dir outputs/quickstart/MODEL-fit-grid \
        --ridges 0.00001 0.0001 0.001 --between-weights 1 0.5 0.25 0.1 0.05

`--model` is the trained model the states were read from (not a fitted one: its row already moved). Writes
`row_fit.json` (the chosen cell, the table, the step's norm and the command) beside the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import torch
from row_fit_selection import add_grid_arguments

from trl_laser.evaluation.sampling import load_for_sampling
from trl_laser.row_fit import (
    DEFAULT_BETWEEN_WEIGHTS,
    DEFAULT_RIDGES,
    ROW_FIT_FILE,
    _check_grid,
    _save,
    choice,
    cross_validate_row_fit,
    load_fitting_states,
    row_fit_step,
)
from trl_laser.settings import resolve_settings


def refit(
    model_dir: str,
    states: str,
    output_dir: str,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    between_weights: Sequence[float] = DEFAULT_BETWEEN_WEIGHTS,
) -> dict[str, Any]:
    """`fit-row`'s choice and step on the saved samples, applied to `model_dir`'s row and saved to `output_dir`."""
    _check_grid(ridges, between_weights, 0.0)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"--output-dir {output_dir} already holds files: give another one.")
    fitting = load_fitting_states(states)
    model, tokenizer = load_for_sampling(model_dir, "cpu")
    settings = resolve_settings(model, tokenizer)
    beta, ref = fitting["beta"], fitting["ref"]
    if not (math.isclose(beta, settings.self_reward_beta) and math.isclose(ref, settings.self_reward_ref_constant)):
        raise ValueError(
            f"{states} was read with beta_v {beta} and c_ref {ref}, {model_dir} scores with "
            f"{settings.self_reward_beta} and {settings.self_reward_ref_constant}: give the model the states came from."
        )
    labels, groups = fitting["labels"], fitting["groups"]
    table = cross_validate_row_fit(
        fitting["states"], fitting["logps"], labels.bool().tolist(), groups.tolist(), beta, ref, ridges,
        between_weights, fitting["folds"], fitting["seed"],
    )  # fmt: skip
    chosen = choice(table)
    step = row_fit_step(
        fitting["states"], fitting["logps"], labels, groups, beta, ref, chosen["ridge"], chosen["between_weight"]
    )
    row = model.get_output_embeddings().weight
    with torch.no_grad():
        row[settings.self_reward_token_id] += step.to(dtype=row.dtype)
    _save(model, tokenizer, settings, model_dir, output_dir)
    result = {
        "model": model_dir,
        "states": states,
        "n_samples": len(labels),
        "chosen": chosen,
        "cross_validation": {"folds": fitting["folds"], "table": table},
        "step_norm": float(step.norm()),
        "command": shlex.join(["python", "benchmarks/refit_from_states.py", *sys.argv[1:]]),
    }
    with open(os.path.join(output_dir, ROW_FIT_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The trained model the states were read from.")
    parser.add_argument("--states", required=True, help="A file written by `trl-laser fit-row --save-states`.")
    parser.add_argument("--output-dir", required=True, help="Where the model with the refitted row goes (new).")
    add_grid_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    result = refit(args.model, args.states, args.output_dir, args.ridges, args.between_weights)
    chosen = result["chosen"]
    print(
        f"chosen ridge {chosen['ridge']:g}, between weight {chosen['between_weight']:g}: cross-validated AUROC "
        f"{chosen['auroc']:.3f}, within a problem {chosen['auroc_within_problem']:.3f}; saved to {args.output_dir}"
    )


if __name__ == "__main__":
    main(make_parser().parse_args())
