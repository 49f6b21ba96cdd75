"""The problem sets of an evaluation and the protocols it follows: benchmark specs, samples per problem, the paper's
sampling, grading and score conventions."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from ..answers import extract_answer, grade_last_boxed, is_correct
from ..data import ARITHMETIC_DATASET, load_problems, make_arithmetic_dataset
from ..scoring import ScoredCompletion, score_completions
from ..settings import SelfRewardSettings
from ..vllm_scoring import VLLMModel, score_completions_vllm


PROTOCOLS = ("default", "paper")
# The paper's evaluation (docs/method.md, "Metrics"): samples per problem by benchmark, and the sampling.
PAPER_NUM_SAMPLES = {"math500": 2, "aime24": 32, "aime25": 32, "amc23": 32, "olympiadbench": 2}
PAPER_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8192}
DEFAULT_SAMPLING = {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 1024}
_YEARS = {"aime2024": "aime24", "aime2025": "aime25", "amc2023": "amc23"}
_BENCHMARK_KEYS = ("n", "split", "config", "problem_column", "answer_column")
BENCHMARK_SYNTAX = "NAME=SOURCE[:N][,split=SPLIT][,config=NAME][,problem_column=COL][,answer_column=COL]"


@dataclasses.dataclass
class Benchmark:
    """One problem set of an evaluation: its name (in the report), where it is, and its own settings (None: global)."""

    name: str
    source: str
    num_samples: int | None = None
    split: str | None = None
    problem_column: str | None = None
    answer_column: str | None = None
    config: str | None = None  # the configuration of a Hub dataset that has several (GSM8K's `main`)


def base_name(source: str) -> str:
    """The last part of a path or Hub id, without its extension: `data/amc23.jsonl` -> `amc23`."""
    return os.path.splitext(str(source).rstrip("/").split("/")[-1])[0]


def paper_benchmark_key(name: str) -> str | None:
    """The paper benchmark a name means (`MATH-500`, `aime_2024`, `HuggingFaceH4/MATH-500`, `amc23.jsonl` ...), or None."""
    key = "".join(c for c in base_name(name).lower() if c.isalnum())
    key = _YEARS.get(key, key)
    return key if key in PAPER_NUM_SAMPLES else None


def parse_benchmark(spec: str) -> Benchmark:
    """Parse `--benchmark NAME=SOURCE[:N][,key=value ...]` (keys: n, split, config, problem_column, answer_column).

    SOURCE is a local file, a Hub dataset or `builtin:arithmetic`; a trailing `:N` (digits) is the samples per problem.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    hint = f"write it as {BENCHMARK_SYNTAX}, e.g. aime24=HuggingFaceH4/aime_2024:32,split=train"
    if not sep or not name or not rest.strip():
        raise ValueError(f"`--benchmark {spec}`: {hint}.")
    if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"`--benchmark {spec}`: the name {name!r} may hold only letters, digits, '-', '_' and '.'.")
    source, *options = [part.strip() for part in rest.split(",")]
    head, colon, tail = source.rpartition(":")
    values: dict[str, str] = {}
    if colon and tail.lstrip("+-").isdigit():  # a signed count too, so that `:-3` is refused as `:0` is
        source, values["n"] = head, tail
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key.strip() not in _BENCHMARK_KEYS or not value.strip():
            raise ValueError(
                f"`--benchmark {spec}`: unknown option {option!r} (options: {', '.join(_BENCHMARK_KEYS)})."
            )
        values[key.strip()] = value.strip()
    if not source:
        raise ValueError(f"`--benchmark {spec}`: no dataset; {hint}.")
    num_samples = None
    if "n" in values:
        if not values["n"].isdigit() or int(values["n"]) < 1:
            raise ValueError(f"`--benchmark {spec}`: the samples per problem must be an integer >= 1.")
        num_samples = int(values["n"])
    return Benchmark(
        name,
        source,
        num_samples,
        values.get("split"),
        values.get("problem_column"),
        values.get("answer_column"),
        values.get("config"),
    )


def named_dataset(dataset: str) -> Benchmark:
    """`--dataset X` as a benchmark named after the file or Hub dataset (the name picks the paper's n)."""
    return Benchmark((base_name(dataset) or str(dataset)).replace(":", "_"), str(dataset))


def protocol_num_samples(protocol: str, benchmark: Benchmark) -> int:
    """The samples per problem a protocol gives a benchmark whose n is not set: the paper's by benchmark, else 4."""
    if protocol != "paper":
        return DEFAULT_SAMPLING["num_samples"]
    key = paper_benchmark_key(benchmark.name) or paper_benchmark_key(benchmark.source)
    if key is None:
        raise ValueError(
            f"`--protocol paper` sets n for MATH500, AIME24, AIME25, AMC23 and OlympiadBench only; benchmark "
            f"{benchmark.name!r} is none of them: give its n ({benchmark.name}={benchmark.source}:N, or --num-samples N)."
        )
    return PAPER_NUM_SAMPLES[key]


def load_benchmark(benchmark: Benchmark, max_problems: int | None, dataset_seed: int) -> list[dict]:
    """The problems of a benchmark (the first `max_problems`); `dataset_seed` generates `builtin:arithmetic`."""
    if benchmark.source == ARITHMETIC_DATASET:
        data = make_arithmetic_dataset(benchmark.split, seed=dataset_seed)
    else:
        data = load_problems(
            benchmark.source, benchmark.split, benchmark.problem_column, benchmark.answer_column, benchmark.config
        )
    if max_problems is not None:
        data = data.select(range(min(max_problems, len(data))))
    return data.to_list()


def grade(completion: str, gold: str) -> tuple[str | None, bool]:
    """The completion's answer (last `\\boxed{}`, else what math-verify extracts; or None) and its correctness.

    Correctness is the training verifier's r_v (`answers.is_correct`), the label the score was trained to predict.
    """
    return extract_answer(completion), is_correct(completion, gold)


def grade_paper(completion: str, gold: str) -> tuple[str | None, bool]:
    """The paper protocol's grading, as the official evaluation (`src/eval_math.py`): its last `\\boxed{}` and whether
    math-verify finds it equal to the gold answer.

    Unlike the official training verifier (`answers.is_correct_boxed`, exactly one box), several boxes are allowed:
    the last one counts. The answer also decides whether a response "has a box" (`paper_conventions`).
    """
    return grade_last_boxed(completion, gold)


def paper_conventions(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    conversations: Sequence[list],
    batch: list[ScoredCompletion],
    rows: list[dict],
    chat_template_kwargs: dict | None,
) -> None:
    """The official evaluation's conventions: a truncated response with a box is scored as if it had ended (EOS
    appended), and a response without a box gets score 0 and counts (`paper_convention` says which applied). `model`
    is a transformers model or a vLLM engine (`vllm_scoring.VLLMModel`), the one that sampled."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id in settings.eos_token_ids else settings.eos_token_ids[0]
    rescore = [i for i, r in enumerate(rows) if r["pred"] is not None and not r["finished"]]
    if rescore:
        prompts = [conversations[batch[i].prompt_index] for i in rescore]
        completions = [batch[i].token_ids + [eos] for i in rescore]
        if isinstance(model, VLLMModel):
            scores = score_completions_vllm(
                model, tokenizer, prompts, completions, settings=settings, chat_template_kwargs=chat_template_kwargs
            )
        else:
            scores = score_completions(
                model,
                tokenizer,
                prompts,
                completions,
                settings=settings,
                chat_template_kwargs=chat_template_kwargs,
                batch_size=len(rescore),
            )
        for i, score in zip(rescore, scores):
            rows[i]["self_reward"] = score
            rows[i]["self_reward_logprob"] = score / settings.self_reward_beta + settings.self_reward_ref_constant
            rows[i]["paper_convention"] = "truncated_with_box_scored"
    for r in rows:
        if r["pred"] is None:
            r["self_reward"] = 0.0
            r["paper_convention"] = "no_box_score_0"
