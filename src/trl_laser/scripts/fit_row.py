"""`trl-laser fit-row`: after training, fit z_c's output row to the model's own answers on training problems.

Samples N completions per training problem at temperature 1, reads each finished completion's EOS state and
log pi(z_c), and solves LaSeR's class-balanced MSE for z_c's row in closed form, with the ridge and the weight of the
part between problems chosen by cross-validation grouped by problem (`trl_laser.row_fit`). Saves the whole model with
the new row to `--output-dir` (never over `--model`) with `row_fit.json`, and prints the cross-validated table and
the chosen fit, and adds the fit to the model card. The score keeps its definition, c_ref and beta_v: evaluate the
output with `trl-laser eval`. `--push-to-hub --hub-model-id ID` then uploads the folder, as `trl-laser train` does.
"""

from __future__ import annotations

import argparse
import json
import sys

from trl_laser.scripts.common import (
    add_sampling_arguments,
    add_self_reward_arguments,
    options_from_args,
    report_errors,
)


DESCRIPTION = "After training: fit z_c's output row to the model's own answers on training problems (closed form)."


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `fit-row` argument parser; added as the subcommand "fit-row" of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("fit-row", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser fit-row", description=DESCRIPTION)
    add_sampling_arguments(parser, num_samples=8, output_dir="fit_row_output", split="train")
    parser.add_argument(
        "--folds", type=int, default=5, help="Cross-validation folds, grouped by problem (default: 5)."
    )
    parser.add_argument(
        "--ridges",
        type=float,
        nargs="+",
        default=None,
        help="Ridges to choose from (default: 0.00001 0.00003 ... 10).",
    )
    parser.add_argument(
        "--between-weights",
        type=float,
        nargs="+",
        default=None,
        help="Weights in (0, 1] of the fit between problems to choose from (default: 1 0.5 0.25 0.1 0.05).",
    )
    parser.add_argument(
        "--other-weight",
        type=float,
        default=None,
        help="Weight of keeping z_c's logit where it was inside the answers, for samplers that ignore the saved "
        "generation config's suppression of z_c (default: 0, off).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the files in a used --output-dir (else refused)."
    )
    parser.add_argument(
        "--save-states",
        default=None,
        metavar="FILE",
        help="Also save what the fit read (EOS states, log pi(z_c), labels, problem ids) to FILE (torch.save), to "
        "study the fit's choice without sampling again; outside --output-dir.",
    )
    parser.add_argument("--json", action="store_true", help="Print the result as JSON instead of a summary.")
    hub = parser.add_argument_group("Hub (as `trl-laser train --push_to_hub`)")
    hub.add_argument(
        "--push-to-hub",
        action="store_true",
        help="Upload the fitted model (weights, self-reward settings, row_fit.json, card) to --hub-model-id.",
    )
    hub.add_argument(
        "--hub-model-id", default=None, help="The Hub repository, e.g. you/SmolLM2-135M-LaSeR (created if needed)."
    )
    hub.add_argument("--hub-token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    hub.add_argument("--hub-private", action="store_true", help="Create the repository private.")
    add_self_reward_arguments(
        parser,
        "self-reward settings (default: the model's self_reward_config.json)",
        ref_constant_help="c_ref of the score (default: the model's saved c_ref).",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Fit the row and print what was chosen; bad input exits with one line on stderr and status 1."""
    from trl_laser.evaluation import Prompt, Sampling, SelfRewardOverrides
    from trl_laser.hub import push_row_fit
    from trl_laser.row_fit import (
        DEFAULT_BETWEEN_WEIGHTS,
        DEFAULT_OTHER_WEIGHT,
        DEFAULT_RIDGES,
        fit_row,
        format_row_fit,
    )

    def fit() -> dict:
        if args.push_to_hub and not args.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id, the repository to upload to (e.g. you/model-fit).")
        return fit_row(
            args.model,
            args.dataset,
            args.output_dir,
            split=args.split,
            problem_column=args.problem_column,
            answer_column=args.answer_column,
            dataset_config=args.dataset_config,
            max_problems=args.max_problems,
            sampling=options_from_args(Sampling, args),
            prompt=options_from_args(Prompt, args),
            self_reward=options_from_args(SelfRewardOverrides, args),
            ridges=args.ridges or DEFAULT_RIDGES,
            between_weights=args.between_weights or DEFAULT_BETWEEN_WEIGHTS,
            other_weight=DEFAULT_OTHER_WEIGHT if args.other_weight is None else args.other_weight,
            folds=args.folds,
            device=args.device,
            overwrite=args.overwrite,
            hub_model_id=args.hub_model_id,
            save_states=args.save_states,
        )

    def push() -> str:
        return push_row_fit(args.output_dir, args.hub_model_id, args.hub_token, True if args.hub_private else None)

    result = report_errors("fit-row", fit)
    print(json.dumps(result, indent=2) if args.json else format_row_fit(result))
    if args.push_to_hub:
        repo_id = report_errors("fit-row", push)
        print(
            f"Model pushed to the Hub in https://huggingface.co/{repo_id}.",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
