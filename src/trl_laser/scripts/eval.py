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

from trl_laser.scripts.common import (
    add_sampling_arguments,
    add_self_reward_arguments,
    options_from_args,
    report_errors,
)


DESCRIPTION = "Evaluate a LaSeR model: accuracy, self-verification (F1, AUROC, ECE), weighted voting, best-of-N."


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
        help="A benchmark (repeatable): NAME=SOURCE[:N][,split=S][,config=C][,problem_column=C][,answer_column=C], "
        "SOURCE a local file, Hub dataset or builtin:arithmetic, N its samples per problem. Instead of --dataset.",
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
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="What samples and scores: transformers' generate (default), or vLLM (each finished completion scored "
        "with one cached token; docs/vllm.md).",
    )
    parser.add_argument(
        "--vllm-kwargs",
        type=_json_object,
        default=None,
        help="JSON object of vllm.LLM arguments with --backend vllm, e.g. "
        '\'{"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}\'.',
    )
    add_self_reward_arguments(
        parser,
        "self-reward overrides (default: the model's self_reward_config.json)",
        ref_constant_help="c_ref, a log-prob <= 0.",
        beta=True,
    )
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def main(args: argparse.Namespace) -> int:
    """Run the evaluation and print its table; bad input exits with one line on stderr and status 1 (130 when
    interrupted, the samples done so far kept)."""
    from trl_laser.evaluation import Prompt, Sampling, SelfRewardOverrides, format_table, run_evaluation, verdict

    def evaluate() -> dict:
        return run_evaluation(
            args.model,
            args.dataset,
            args.output_dir,
            benchmarks=args.benchmark or (),
            protocol=args.protocol,
            split=args.split,
            problem_column=args.problem_column,
            answer_column=args.answer_column,
            dataset_config=args.dataset_config,
            max_problems=args.max_problems,
            sampling=options_from_args(Sampling, args),
            prompt=options_from_args(Prompt, args),
            self_reward=options_from_args(SelfRewardOverrides, args),
            num_subsets=args.num_subsets,
            overwrite=args.overwrite,
            device=args.device,
            backend=args.backend,
            vllm_kwargs=args.vllm_kwargs,
        )

    interrupted = (
        f"interrupted; the samples done so far are kept in {args.output_dir}: run the same command again to resume."
    )
    summary = report_errors("eval", evaluate, interrupted)
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
    sys.exit(main(make_parser().parse_args()))
