"""c_ref before training: log pi(z_c | x, y, EOS) of a model over sampled completions (`trl-laser
estimate-ref-constant` runs `run_estimate`), and why a candidate z_c may be a poor choice.

The paper found this log-prob almost constant for a well-chosen z_c (-23.11 +- 0.04 for Qwen2.5 with
`<|vision_start|>`), which is what lets a constant c_ref stand in for the reference model. Completions are sampled at
temperature 1 and z_c's log-prob read from the raw logits at each finished completion's EOS position. A token is a
poor choice when its log-prob varies a lot, when it is not rare after EOS, or when it already tracks correctness.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .answers import is_correct
from .data import default_instruction, load_problems, make_conversation
from .evaluation.sampling import default_device, load_for_sampling
from .evaluation.summary import auroc_null_std
from .metrics import auroc
from .scoring import generate_with_self_rewards


def c_ref_statistics(logps: Sequence[float]) -> dict[str, float | int]:
    """Mean, std, min and max of log pi(z_c | x, y, EOS) over the finished completions."""
    return {
        "n_finished": len(logps),
        "mean": statistics.fmean(logps),
        "std": statistics.stdev(logps) if len(logps) > 1 else 0.0,
        "min": min(logps),
        "max": max(logps),
    }


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
    # The score's beta and c_ref do not matter here: only the raw log-prob of z_c is read.
    samples = generate_with_self_rewards(
        model,
        tokenizer,
        prompts,
        samples_per_prompt,
        overrides={"self_reward_token": token, "self_reward_ref_constant": 0.0, "self_reward_beta": 1.0},
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
        **c_ref_statistics(logps),
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
        result["auroc_null_std"] = auroc_null_std(labels)
    result["warnings"] = token_warnings(result, tokenizer, max_std)
    return result


def token_warnings(result: dict[str, Any], tokenizer: Any, max_std: float) -> list[str]:
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


def run_estimate(
    model_name_or_path: str,
    token: str | int,
    dataset: str = "builtin:arithmetic",
    *,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    dataset_config: str | None = None,
    instruction: str | None = None,
    system_prompt: str | None = None,
    num_samples: int = 64,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    max_std: float = 1.0,
) -> dict[str, Any]:
    """Load the model and `num_samples / samples_per_prompt` problems drawn with `seed`, and `estimate` on them.

    Without an answer column (`answer_column=""`) correctness is not measured. Bad input raises `ValueError` before
    the model loads.
    """
    import torch

    for name, value in (
        ("num_samples", num_samples),
        ("samples_per_prompt", samples_per_prompt),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    # Without an answer column the problem column stands in for it, and correctness is not measured.
    problems = load_problems(dataset, split, problem_column, answer_column or problem_column, dataset_config)
    num_prompts = min(len(problems), math.ceil(num_samples / samples_per_prompt))
    problems = problems.shuffle(seed=seed).select(range(num_prompts))
    instruction = instruction if instruction is not None else default_instruction(dataset)
    prompts = [make_conversation(p, system_prompt, instruction) for p in problems["problem"]]
    answers = list(problems["answer"]) if answer_column else None

    model, tokenizer = load_for_sampling(model_name_or_path, default_device(device))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    result = estimate(
        model, tokenizer, prompts, token, answers, samples_per_prompt, max_new_tokens, batch_size, max_std
    )
    result.update(model=model_name_or_path, dataset=dataset)
    return result


def format_estimate(result: dict[str, Any]) -> str:
    """The estimate as text: mean +- std, min, max, the suggested c_ref, correctness and the warnings."""
    lines = [
        f"log pi({result['token']} | x, y, EOS), token id {result['token_id']}, temperature 1, over "
        f"{result['n_finished']} finished of {result['n_completions']} completions:",
        f"  mean {result['mean']:.4f} +- {result['std']:.4f} (std)   min {result['min']:.4f}   max {result['max']:.4f}",
        f"  suggested self_reward_ref_constant: {result['mean']:.2f}",
    ]
    if result["accuracy"] is not None:
        auroc_text = "n/a (one class only)" if result["auroc"] is None else f"{result['auroc']:.3f}"
        lines.append(
            f"  accuracy of the completions {result['accuracy']:.3f}; AUROC of the log-prob vs correctness {auroc_text}"
        )
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)
