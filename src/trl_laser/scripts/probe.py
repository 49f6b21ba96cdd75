"""`trl-laser probe`: before training, does a model's EOS state already know whether its answer is right?

Samples N completions per problem at temperature 1, reads the final hidden state at each finished completion's EOS
position (the state from which the model predicts z_c), and ranks right above wrong with a cross-validated linear
read-out of that state (the ceiling of what training z_c's row can reach), the free confidence signals (mean / min
token log-prob, answer agreement) and the current z_c score; also log pi(z_c | x, y, EOS) statistics for c_ref.
Writes `probe.json` and `samples.jsonl` into `--output-dir` and prints a table (`--json`: the JSON instead). Bad
input (a missing column, too few problems for the folds, `--num-samples 0`) ends with a one-line error and a non-zero
exit status, before the model loads.
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


DESCRIPTION = (
    "Before training: how well do the EOS state (cross-validated linear read-out), the free confidence signals and "
    "the z_c score tell right from wrong?"
)


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `probe` argument parser; added as the subcommand "probe" of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("probe", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser probe", description=DESCRIPTION)
    add_sampling_arguments(parser, num_samples=8, output_dir="probe_output")
    parser.add_argument(
        "--folds", type=int, default=5, help="Cross-validation folds, grouped by problem (default: 5)."
    )
    parser.add_argument(
        "--readout-c",
        type=float,
        nargs="+",
        default=None,
        help="Inverse L2 strengths C to choose from per fold by an inner grouped split (default: 0.001 0.003 ... 0.3 1).",
    )
    parser.add_argument("--json", action="store_true", help="Print the result as JSON instead of a table.")
    add_self_reward_arguments(
        parser,
        "self-reward token (default: the model's self_reward_config.json)",
        ref_constant_help="c_ref of the z_c score (default: the measured mean of log pi(z_c | x, y, EOS)).",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the probe and print its table (or JSON); bad input exits with one line on stderr and status 1."""
    from trl_laser.evaluation import Prompt, Sampling, SelfRewardOverrides
    from trl_laser.probe import DEFAULT_C_VALUES, format_probe_table, run_probe

    def probe() -> dict:
        return run_probe(
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
            folds=args.folds,
            c_values=DEFAULT_C_VALUES if args.readout_c is None else args.readout_c,
            device=args.device,
        )

    result = report_errors("probe", probe)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_probe_table(result))
        print(f"Wrote probe.json and samples.jsonl to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
