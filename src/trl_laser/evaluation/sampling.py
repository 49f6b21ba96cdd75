"""The one sampler of `trl-laser eval`, `trl-laser probe` and the benchmarks: generate, score and grade N solutions per
problem, one batch of graded records at a time, from any batch on (so that an interrupted run can resume). It samples
with transformers' `generate` (`scoring`), or with vLLM when given a `vllm_scoring.VLLMModel`.

Also what a sampling run is asked (`Sampling`, `SelfRewardOverrides`, checked by `check_counts`) and where it runs
(`default_device`, `load_for_sampling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models import load_model_and_tokenizer
from ..scoring import ScoredCompletion, iter_generate_with_self_rewards
from ..settings import SelfRewardSettings, resolve_settings
from ..vllm_scoring import VLLMModel, iter_generate_with_vllm
from .protocol import grade, grade_paper, paper_conventions


@dataclasses.dataclass
class Sampling:
    """How many solutions each problem gets and how they are sampled; `None`: the protocol's default."""

    num_samples: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    batch_size: int = 8
    seed: int = 0


@dataclasses.dataclass
class SelfRewardOverrides:
    """The self-reward settings given instead of the model's saved ones (`None`: the saved value)."""

    self_reward_token: str | int | None = None
    self_reward_ref_constant: float | None = None
    self_reward_beta: float | None = None


def check_counts(counts: dict[str, int | None]) -> None:
    """Each given count (`num_samples`, `batch_size` ...; `None`: not given) must be an integer >= 1."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}.")


def default_device(device: str | None) -> str:
    """`device`, else cuda when there is one, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_sampling(model_name_or_path: str, device: str) -> tuple[Any, Any]:
    """The model on `device` (in float32 on the CPU, else in its saved dtype) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype=torch.float32 if device == "cpu" else "auto")
    model.to(device)
    return model, tokenizer


def graded_record(problem: dict, s: ScoredCompletion, protocol: str, keep_token_ids: bool = False) -> dict:
    """One line of `samples.jsonl`: the sample, its answer and correctness (graded as `protocol` grades), its score
    and free confidence signals, and the problem's `difficulty` when it has one; the generated ids too with
    `keep_token_ids` (`token_ids`, for an exact second forward)."""
    gold = str(problem["answer"])
    pred, correct = grade_paper(s.text, gold) if protocol == "paper" else grade(s.text, gold)
    record = {
        "problem_index": s.prompt_index,
        "sample_index": s.sample_index,
        "problem": problem["problem"],
        "gold": gold,
        "completion": s.text,
        "pred": pred,
        "correct": correct,
        "finished": s.finished,
        "self_reward": s.self_reward,
        "self_reward_logprob": s.self_reward_logprob,
        "num_tokens": len(s.token_ids),
        "mean_token_logprob": s.mean_token_logprob,
        "min_token_logprob": s.min_token_logprob,
    }
    if problem.get("difficulty") is not None:
        record["difficulty"] = problem["difficulty"]
    if keep_token_ids:
        record["token_ids"] = s.token_ids
    return record


def sample_batches(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    problems: Sequence[dict],
    conversations: Sequence[list],
    num_samples: int,
    *,
    protocol: str = "default",
    batch_size: int = 8,
    start: int = 0,
    seed: int | None = None,
    chat_template_kwargs: dict | None = None,
    keep_token_ids: bool = False,
    progress: bool = True,
    desc: str = "sampling",
    **generation: Any,
) -> Iterator[list[dict]]:
    """Sample `num_samples` solutions of each `{"problem", "answer"}` (prompted as `conversations`), score and grade
    them: yields each generate call's records (`graded_record`) as soon as it is done. `model` is a transformers model,
    or a vLLM engine (`vllm_scoring.VLLMModel`: the same records, sampled and scored by vLLM).

    The samples are the (problem, sample) pairs in order, `batch_size` a call, from sample `start` on (a multiple of
    `batch_size`: where an interrupted run stopped). With `seed`, each call is seeded from `seed` and its position, so a
    resumed run equals an uninterrupted one; without it, sampling continues the global random state. The paper
    protocol grades as the official evaluation and applies its score conventions (`paper_conventions`). `generation`
    is `generate`'s (`max_new_tokens`, `temperature`, `top_p` ...). `answer_agreement` needs all samples of a problem:
    set it afterwards (`add_answer_agreement`).
    """
    total = len(problems) * num_samples
    if start >= total:  # a finished run, resumed: nothing left (its total need not be a multiple of batch_size)
        return
    settings = resolve_settings(model, tokenizer, settings)  # EOS ids the model's, where they were not saved
    sampler = iter_generate_with_vllm if isinstance(model, VLLMModel) else iter_generate_with_self_rewards
    batches = sampler(
        model,
        tokenizer,
        conversations,
        num_samples,
        settings=settings,
        batch_size=batch_size,
        chat_template_kwargs=chat_template_kwargs,
        start=start,
        seed=seed,
        **generation,
    )
    with tqdm(total=total, initial=start, desc=desc, unit="sample", disable=not progress) as bar:
        for batch in batches:
            rows = [graded_record(problems[s.prompt_index], s, protocol, keep_token_ids) for s in batch]
            if protocol == "paper":
                paper_conventions(model, tokenizer, settings, conversations, batch, rows, chat_template_kwargs)
            yield rows
            bar.update(len(rows))
