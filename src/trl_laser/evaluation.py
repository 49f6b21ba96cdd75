"""Test-time evaluation of a LaSeR model: sample N solutions per problem, grade them, score them, vote, report.

`run_evaluation` is what `trl-laser eval` runs. Every number comes from one set of samples: the votes over 1..N
samples (inference-time scaling) are recomputed on random subsets of them, never regenerated. Each metric is also
reported on the "answer extracted" subset (the paper's "filtered" variant: samples whose answer could be read).
Beside the LaSeR score stand the free confidence signals every sample has without training (`BASELINES`: mean and
minimum token log-prob, agreement with the other samples), ranked on the same samples: a LaSeR score that does not
beat them is not worth its training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .answers import extract_answer, grade_last_boxed, is_correct
from .data import (
    ARITHMETIC_DATASET,
    ARITHMETIC_DIFFICULTIES,
    PAPER_INSTRUCTION,
    default_instruction,
    load_problems,
    make_arithmetic_dataset,
    make_conversation,
)
from .metrics import auroc, auroc_within_group, self_verification_metrics
from .models import load_model, resolve_model_path
from .scoring import (
    ScoredCompletion,
    generate_with_self_rewards,
    iter_generate_with_self_rewards,
    load_lm_head_fp32,
    resolve_settings,
    score_completions,
)
from .settings import SelfRewardSettings
from .voting import accuracy, answer_agreement, group_answers, vote_correctness


VOTE_KEYS = ("majority", "weighted", "best_of_n")
_VOTE_SUMMARY_KEYS = {"majority": "majority_at_n", "weighted": "weighted_at_n", "best_of_n": "best_of_n"}
SUMMARY_KEYS = (
    "n_problems",
    "n_samples",
    "accuracy",
    "majority_at_n",
    "weighted_at_n",
    "best_of_n",
    "sv_accuracy",
    "sv_f1_paper",
    "sv_f1_binary",
    "auroc",
    "ece",
)
# Free confidence signals of every sample, reported beside the LaSeR score: what a score that costs training must beat.
BASELINES = ("mean_token_logprob", "min_token_logprob", "answer_agreement")


def grade(completion: str, gold: str) -> tuple[str | None, bool]:
    """The completion's answer (last `\\boxed{}`, else what math-verify extracts; or None) and its correctness.

    Correctness is the training verifier's r_v (`answers.is_correct`), the label the score was trained to predict.
    """
    return extract_answer(completion), is_correct(completion, gold)


def _by_problem(records: Sequence[dict]) -> list[list[dict]]:
    problems: dict[int, list[dict]] = {}
    for record in records:
        problems.setdefault(record["problem_index"], []).append(record)
    return [sorted(rows, key=lambda r: r["sample_index"]) for _, rows in sorted(problems.items())]


def _votes(rows: Sequence[dict]) -> dict[str, bool]:
    return vote_correctness([r["pred"] for r in rows], [r["self_reward"] for r in rows], [r["correct"] for r in rows])


def summarize_subset(records: Sequence[dict], num_problems: int) -> dict[str, Any]:
    """Accuracy, votes at N and self-verification metrics of `records` (problems without records count as wrong).

    `baselines` ranks the same samples by the free confidence signals (`BASELINES`), on exactly the samples that
    have a LaSeR score, so that each `auroc` there compares with the top-level one sample for sample.
    """
    votes = [_votes(rows) for rows in _by_problem(records)]
    sv = self_verification_metrics([r["self_reward"] for r in records], [r["correct"] for r in records])
    scores = {True: [], False: []}
    for r in records:
        if r["self_reward"] is not None:
            scores[bool(r["correct"])].append(r["self_reward"])
    scored = [r for r in records if r["self_reward"] is not None]
    labels, problems = [r["correct"] for r in scored], [r["problem_index"] for r in scored]
    bands = [r.get("difficulty") for r in scored]
    names = band_names(r.get("difficulty") for r in records)
    laser = ranking([r["self_reward"] for r in scored], labels, problems, bands, names)
    baselines = {key: ranking([r.get(key) for r in scored], labels, problems, bands, names) for key in BASELINES}
    # The mean token log-prob as a voting weight: exp() of it is the geometric-mean token probability, in [0, 1].
    confidence = [_vote_confidence(rows) for rows in _by_problem(records)]
    baselines["mean_token_logprob"]["weighted_at_n"] = _rate(confidence, "weighted", num_problems)
    baselines["mean_token_logprob"]["best_of_n"] = _rate(confidence, "best_of_n", num_problems)
    reference = baselines["mean_token_logprob"]["auroc"]
    return {
        "n_problems": num_problems,
        "n_samples": len(records),
        "n_finished": sum(bool(r["finished"]) for r in records),
        "n_answered": sum(r["pred"] is not None for r in records),
        "accuracy": accuracy([r["correct"] for r in records]),
        **{name: _rate(votes, key, num_problems) for key, name in _VOTE_SUMMARY_KEYS.items()},
        **{k: sv[k] for k in ("sv_accuracy", "sv_f1_paper", "sv_f1_binary", "auroc", "ece", "tpr", "tnr")},
        "n_scored": sv["n"],
        "mean_self_reward_correct": sum(scores[True]) / len(scores[True]) if scores[True] else None,
        "mean_self_reward_incorrect": sum(scores[False]) / len(scores[False]) if scores[False] else None,
        "auroc_within_problem": laser["auroc_within_problem"],
        "auroc_by_band": laser["auroc_by_band"],
        "baselines": baselines,
        "laser_vs_mean_token_logprob_auroc": None if None in (sv["auroc"], reference) else sv["auroc"] - reference,
    }


def band_names(difficulties: Iterable[str | None]) -> list[str] | None:
    """The difficulty bands present, easiest first for the built-in names, others after them alphabetically.

    `None` when no sample has a difficulty (a dataset without that column).
    """
    known = list(ARITHMETIC_DIFFICULTIES)
    present = {d for d in difficulties if d is not None}
    if not present:
        return None
    return sorted(present, key=lambda d: (known.index(d) if d in known else len(known), str(d)))


def ranking(
    scores: Sequence[float | None],
    labels: Sequence[bool],
    problems: Sequence[Hashable],
    bands: Sequence[str | None] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How well one signal ranks right above wrong: AUROC overall, within a problem, and within each band.

    Within a problem, a signal cannot profit from knowing that a problem is hard; within a band, only a little.
    `names` are the bands to report, in order (default: `band_names(bands)`); `auroc_by_band` is `None` without
    bands, and a band with one class only (or no sample) has AUROC `None`. Rows with a `None` score are left out.
    """
    names = band_names(bands or []) if names is None else names
    by_band = None
    if bands is not None and names is not None:
        by_band = {
            name: auroc(
                [s for s, b in zip(scores, bands) if b == name], [y for y, b in zip(labels, bands) if b == name]
            )
            for name in names
        }
    return {
        "auroc": auroc(scores, labels),
        "auroc_within_problem": auroc_within_group(scores, labels, problems),
        "auroc_by_band": by_band,
    }


def _vote_confidence(rows: Sequence[dict]) -> dict[str, bool]:
    """Weighted vote and best-of-N of one problem with exp(mean token log-prob) in place of r_s."""
    weights = [None if r.get("mean_token_logprob") is None else math.exp(r["mean_token_logprob"]) for r in rows]
    return vote_correctness([r["pred"] for r in rows], weights, [r["correct"] for r in rows])


def _rate(votes: Sequence[dict[str, bool]], key: str, num_problems: int) -> float | None:
    return sum(v[key] for v in votes) / num_problems if num_problems else None


def summarize(records: Sequence[dict], num_problems: int) -> dict[str, Any]:
    """The summary over all samples, with the same metrics under `filtered` for the samples with an answer."""
    summary = summarize_subset(records, num_problems)
    summary["filtered"] = summarize_subset([r for r in records if r["pred"] is not None], num_problems)
    return summary


def scaling_curves(
    records: Sequence[dict], num_samples: int, num_subsets: int = 16, seed: int = 0
) -> dict[str, list[float | None]]:
    """Accuracy of each vote with k = 1..N samples per problem, averaged over `num_subsets` random k-subsets.

    Answers are grouped once over all N samples of a problem, so each subset's vote only counts (no re-verifying).
    `sample_accuracy` is the plain per-sample accuracy, the same for every k (the expected accuracy of one sample).
    """
    rng = random.Random(seed)
    problems = []
    for rows in _by_problem(records):
        canonical: list[str | None] = [None] * len(rows)
        for group in group_answers([r["pred"] for r in rows]):
            for i in group:
                canonical[i] = rows[group[0]]["pred"]
        problems.append([dict(r, pred=a) for r, a in zip(rows, canonical)])
    curves: dict[str, list[float | None]] = {"k": list(range(1, num_samples + 1)), **{k: [] for k in VOTE_KEYS}}
    for k in curves["k"]:
        totals = dict.fromkeys(VOTE_KEYS, 0.0)
        count = 0
        for _ in range(num_subsets if k < num_samples else 1):
            for rows in problems:
                # A random subset in random order (votes break ties by order, so at random); all N samples in their
                # own order, so that the curve ends at the summary's value.
                subset = rows if k >= len(rows) else [rows[i] for i in rng.sample(range(len(rows)), k)]
                for key, ok in _votes(subset).items():
                    totals[key] += ok
                count += 1
        for key in VOTE_KEYS:
            curves[key].append(totals[key] / count if count else None)
    curves["sample_accuracy"] = [accuracy([r["correct"] for r in records])] * num_samples
    return curves


def plot_reliability(
    scores: Sequence[float | None], labels: Sequence[bool], path: str | os.PathLike, num_bins: int = 10
) -> None:
    """Reliability diagram of clamp(r_s, 0, 1) against correctness (the bins of the ECE), with a count histogram."""
    pairs = [(min(max(float(s), 0.0), 1.0), bool(y)) for s, y in zip(scores, labels) if s is not None]
    width = 1.0 / num_bins
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(num_bins)]
    for c, y in pairs:
        bins[min(int(c * num_bins), num_bins - 1)].append((c, y))
    centers = [(b + 0.5) * width for b in range(num_bins)]
    acc = [sum(y for _, y in b) / len(b) if b else 0.0 for b in bins]
    conf = [sum(c for c, _ in b) / len(b) if b else math.nan for b in bins]
    ece = self_verification_metrics(scores, labels, num_bins=num_bins)["ece"]

    fig = Figure(figsize=(5, 6))  # no pyplot: the caller's matplotlib backend is left alone
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centers, acc, width=width * 0.9, color="tab:blue", alpha=0.8, label="accuracy in bin")
    top.plot(centers, conf, "o", color="tab:red", label="mean clamp(r_s, 0, 1)")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("fraction correct")
    title = "Reliability of the self-reward score"
    top.set_title(f"{title} (ECE {ece:.3f})" if ece is not None else f"{title} (no finished samples)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [len(b) for b in bins], width=width * 0.9, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("clamp(r_s, 0, 1)")
    bottom.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_scaling(curves: dict[str, list[float | None]], path: str | os.PathLike) -> None:
    """Accuracy of majority, weighted and best-of-N against the number of samples (inference-time scaling)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    labels = {"majority": "majority vote", "weighted": "self-reward weighted vote", "best_of_n": "best-of-N (r_s)"}
    for key, label in labels.items():
        ax.plot(curves["k"], [math.nan if v is None else v for v in curves[key]], "o-", label=label)
    ax.plot(curves["k"], [math.nan if v is None else v for v in curves["sample_accuracy"]], "--", color="gray")
    ax.plot([], [], "--", color="gray", label="single-sample accuracy")
    ax.set_xlabel("samples per problem (k)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(curves["k"] if len(curves["k"]) <= 16 else ax.get_xticks())
    ax.set_xlim(0.5, max(curves["k"]) + 0.5)
    ax.set_title("Inference-time scaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as text: one metric a row (all samples beside the "answer extracted" subset), then the LaSeR
    score beside the free confidence signals on the scored samples (AUROC overall, within a problem, per band)."""
    rows = [("metric", "all", "answer extracted")]
    for key in SUMMARY_KEYS:
        rows.append((key, _cell(summary.get(key)), _cell(summary["filtered"].get(key))))
    tables = [_text_table(rows)]
    if "baselines" in summary:
        signals = {"laser r_s": summary, **summary["baselines"]}
        tables.append(
            f"ranking of right above wrong ({summary['n_scored']} scored samples), with the free confidence signals:\n"
            + signal_table(signals, extra=("weighted_at_n", "best_of_n"))
        )
    return "\n\n".join(tables)


def verdict(summary: dict[str, Any]) -> str:
    """One line: does the LaSeR score rank right answers above wrong ones, and better than the free signal?"""
    laser, free = summary.get("auroc"), summary.get("baselines", {}).get("mean_token_logprob", {}).get("auroc")
    if laser is None:
        return "Self-verification: no AUROC (the scored samples are all right or all wrong)."
    line = f"Self-verification on {summary['n_scored']} scored samples: LaSeR AUROC {laser:.3f}"
    if free is None:
        return line + "."
    better = "beats" if laser > free else "does not beat"
    return f"{line} {better} the free mean token log-prob ({free:.3f}, {laser - free:+.3f})."


def signal_table(signals: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """One row per signal: AUROC overall, within a problem, per band (when there are bands), then the `extra` keys."""
    bands = next((list(v["auroc_by_band"]) for v in signals.values() if v.get("auroc_by_band")), [])
    rows = [("signal", "auroc", "within problem", *(f"auroc {b}" for b in bands), *extra)]
    for name, values in signals.items():
        by_band = values.get("auroc_by_band") or {}
        rows.append(
            (
                name,
                _cell(values.get("auroc")),
                _cell(values.get("auroc_within_problem")),
                *(_cell(by_band.get(b)) for b in bands),
                *(_cell(values.get(k)) for k in extra),
            )
        )
    return _text_table(rows)


def _text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def grade_paper(completion: str, gold: str) -> tuple[str | None, bool]:
    """The paper protocol's grading, as the official evaluation (`src/eval_math.py`): its last `\\boxed{}` and whether
    math-verify finds it equal to the gold answer.

    Unlike the official training verifier (`answers.is_correct_boxed`, exactly one box), several boxes are allowed:
    the last one counts. The answer also decides whether a response "has a box" (`run_evaluation`).
    """
    return grade_last_boxed(completion, gold)


def _record(problem: dict, s: ScoredCompletion, graded: tuple[str | None, bool], keep_token_ids: bool) -> dict:
    pred, correct = graded
    record = {
        "problem_index": s.prompt_index,
        "sample_index": s.sample_index,
        "problem": problem["problem"],
        "gold": str(problem["answer"]),
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


def add_answer_agreement(records: Sequence[dict]) -> None:
    """Set each record's `answer_agreement` (the other samples of its problem with an equivalent answer)."""
    for rows in _by_problem(records):
        for row, agreement in zip(rows, answer_agreement([r["pred"] for r in rows])):
            row["answer_agreement"] = agreement


def sample_records(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict],
    num_samples: int,
    *,
    system_prompt: str | None = None,
    instruction: str = PAPER_INSTRUCTION,
    instruction_separator: str = "\n",
    batch_size: int = 8,
    progress: bool = True,
    keep_token_ids: bool = False,
    **kwargs: Any,
) -> list[dict]:
    """Generate, score and grade `num_samples` solutions of each `{"problem", "answer"}`: one record per sample.

    Each record also carries the free confidence signals (`BASELINES`) and the problem's `difficulty` when it has one;
    with `keep_token_ids`, the generated ids too (`token_ids`, for an exact second forward). `kwargs` are
    `generate_with_self_rewards`'s (settings overrides and generation arguments).
    """
    prompts = [make_conversation(p["problem"], system_prompt, instruction, instruction_separator) for p in problems]
    results = generate_with_self_rewards(
        model, tokenizer, prompts, num_samples, batch_size=batch_size, progress=progress, **kwargs
    )
    records = []
    with tqdm(total=len(problems) * num_samples, desc="grading", unit="sample", disable=not progress) as bar:
        for problem, samples in zip(problems, results):
            for s in samples:
                records.append(_record(problem, s, grade(s.text, str(problem["answer"])), keep_token_ids))
                bar.update(1)
    add_answer_agreement(records)
    return records


# ---------------------------------------------------------------------------------------------------- benchmarks
PROTOCOLS = ("default", "paper")
# The paper's evaluation (LASER_SPEC.md "Evaluation"): samples per problem by benchmark, and the sampling.
PAPER_NUM_SAMPLES = {"math500": 2, "aime24": 32, "aime25": 32, "amc23": 32, "olympiadbench": 2}
PAPER_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8192}
DEFAULT_SAMPLING = {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 1024}
_YEARS = {"aime2024": "aime24", "aime2025": "aime25", "amc2023": "amc23"}
_BENCHMARK_KEYS = ("n", "split", "problem_column", "answer_column")
BENCHMARK_SYNTAX = "NAME=SOURCE[:N][,split=SPLIT][,problem_column=COL][,answer_column=COL]"
# What a run writes into its output folder (and per benchmark, into NAME/): `--overwrite` removes only these.
RUN_FILE = "eval_run.json"
_OUTPUT_FILES = ("samples.jsonl", "summary.json", "reliability.png", "scaling.png", "results.md", RUN_FILE)


@dataclasses.dataclass
class Benchmark:
    """One problem set of an evaluation: its name (in the report), where it is, and its own settings (None: global)."""

    name: str
    source: str
    num_samples: int | None = None
    split: str | None = None
    problem_column: str | None = None
    answer_column: str | None = None


def paper_benchmark_key(name: str) -> str | None:
    """The paper benchmark a name means (`MATH-500`, `aime_2024`, `HuggingFaceH4/MATH-500`, `amc23.jsonl` ...), or None."""
    key = "".join(c for c in _base_name(name).lower() if c.isalnum())
    key = _YEARS.get(key, key)
    return key if key in PAPER_NUM_SAMPLES else None


def parse_benchmark(spec: str) -> Benchmark:
    """Parse `--benchmark NAME=SOURCE[:N][,key=value ...]` (keys: n, split, problem_column, answer_column).

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
    if colon and tail.isdigit():
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
        name, source, num_samples, values.get("split"), values.get("problem_column"), values.get("answer_column")
    )


def _load_benchmark(benchmark: Benchmark, max_problems: int | None, dataset_seed: int) -> list[dict]:
    if benchmark.source == ARITHMETIC_DATASET:
        data = make_arithmetic_dataset(benchmark.split, seed=dataset_seed)
    else:
        data = load_problems(benchmark.source, benchmark.split, benchmark.problem_column, benchmark.answer_column)
    if max_problems is not None:
        data = data.select(range(min(max_problems, len(data))))
    return data.to_list()


# ---------------------------------------------------------------------------------------------------- the run
def _print_now(message: str) -> None:
    print(message, flush=True)  # at once: a run killed right after still has said it


def run_evaluation(
    model_name_or_path: str,
    dataset: str | None,
    output_dir: str | os.PathLike,
    *,
    benchmarks: Sequence[str | Benchmark] = (),
    protocol: str = "default",
    split: str = "test",
    problem_column: str = "problem",
    answer_column: str = "answer",
    num_samples: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    system_prompt: str | None = None,
    instruction: str | None = None,
    instruction_separator: str | None = None,
    chat_template_kwargs: dict | None = None,
    dataset_seed: int | None = None,
    max_problems: int | None = None,
    self_reward_token: str | int | None = None,
    self_reward_ref_constant: float | None = None,
    self_reward_beta: float | None = None,
    num_subsets: int = 16,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _print_now,
) -> dict[str, Any]:
    """Evaluate a model on one problem set (`dataset`) or several (`benchmarks`) and write the results.

    With `dataset`: `samples.jsonl`, `summary.json`, the PNG plots and `results.md` in `output_dir`. With
    `benchmarks` (`parse_benchmark` specs): the same per benchmark in `output_dir/NAME/`, and in `output_dir` a
    `summary.json` and `results.md` with each benchmark and their average in the layout of the paper's table.

    Every input is checked before the model loads. Samples are appended to `samples.jsonl` as each batch is done; a
    second call with the same arguments resumes after the last complete batch (each batch's sampling is seeded from
    `seed` and its position, so the result equals an uninterrupted run), while a folder holding another run's samples
    is refused unless `overwrite`, which removes only this function's own files. Unset prompt settings (system prompt,
    instruction, separator, chat-template arguments, dataset seed) are those saved with the model by `trl-laser
    train`; unset sampling settings are the protocol's. Returns the summary (of the one dataset, or the aggregate).
    """
    _check_options(protocol, batch_size, num_subsets, max_problems, num_samples, max_new_tokens, temperature, top_p)
    flat = not benchmarks
    if flat == (dataset is None):
        raise ValueError(
            "Give one problem set (`dataset`, --dataset) or benchmarks (--benchmark), not both or neither."
        )
    items = (
        [_named_dataset(dataset)]
        if flat
        else [b if isinstance(b, Benchmark) else parse_benchmark(b) for b in benchmarks]
    )
    names = [b.name for b in items]
    if len(set(names)) != len(names):
        raise ValueError(f"`--benchmark` names must differ, got {names}.")
    for b in items:
        b.split = b.split or split
        b.problem_column = b.problem_column or problem_column
        b.answer_column = b.answer_column or answer_column
        b.num_samples = b.num_samples or num_samples or _protocol_num_samples(protocol, b)
    sampling = PAPER_SAMPLING if protocol == "paper" else DEFAULT_SAMPLING
    max_new_tokens = max_new_tokens or sampling["max_new_tokens"]
    temperature = sampling["temperature"] if temperature is None else temperature
    top_p = sampling["top_p"] if top_p is None else top_p

    # The model's tokenizer and saved settings, before its weights: a bad token or c_ref costs no loading time.
    from transformers import AutoTokenizer

    model_path = resolve_model_path(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    saved = _saved_settings(model_path)
    overrides = {
        "self_reward_token": self_reward_token,
        "self_reward_ref_constant": self_reward_ref_constant,
        "self_reward_beta": self_reward_beta,
    }
    checked = resolve_settings(None, tokenizer, saved or model_path, **overrides)
    prompt, sources = _prompt_settings(
        saved, items, system_prompt, instruction, instruction_separator, chat_template_kwargs, dataset_seed
    )
    problems = {b.name: _load_benchmark(b, max_problems, prompt["dataset_seed"]) for b in items}

    run = {
        "model": model_name_or_path,
        "benchmarks": [dataclasses.asdict(b) for b in items],
        "protocol": protocol,
        "max_problems": max_problems,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "batch_size": batch_size,
        **prompt,
        "self_reward": {
            k: checked.to_dict()[k] for k in ("self_reward_token_id", "self_reward_beta", "self_reward_ref_constant")
        },
    }
    output_dir = str(output_dir)
    dirs = {b.name: output_dir if flat else os.path.join(output_dir, b.name) for b in items}
    totals = {b.name: len(problems[b.name]) * b.num_samples for b in items}
    done = _prepare_output(output_dir, run, dirs, totals, overwrite)
    if any(done.values()):
        log(f"Resuming the run in {output_dir}: {sum(done.values())} of {sum(totals.values())} samples already there.")

    import torch

    model = load_model(model_path)  # the tokenizer and the resolved path of the checks above
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    settings = resolve_settings(model, tokenizer, saved or model_path, **overrides)
    if settings.cast_lm_head_to_fp32:
        load_lm_head_fp32(model, model_path)

    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    config = {
        **run,
        "dataset": dataset,
        "split": split,
        "num_samples": items[0].num_samples if flat else {b.name: b.num_samples for b in items},
        "settings_from": sources,
        "self_reward": settings.to_dict(),
    }
    summaries = {}
    for b in items:
        start = time.perf_counter()
        records = _sample_benchmark(
            model,
            tokenizer,
            settings,
            b,
            problems[b.name],
            dirs[b.name],
            done[b.name],
            protocol,
            prompt,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            **generation,
        )
        summary = summarize(records, len(problems[b.name]))
        summary["scaling"] = scaling_curves(records, b.num_samples, num_subsets=num_subsets, seed=seed)
        summary["config"] = {**config, "benchmark": b.name, "generation_seconds": time.perf_counter() - start}
        _write_json(os.path.join(dirs[b.name], "summary.json"), summary)
        plot_reliability(
            [r["self_reward"] for r in records], [r["correct"] for r in records], _png(dirs[b.name], "reliability")
        )
        plot_scaling(summary["scaling"], _png(dirs[b.name], "scaling"))
        summaries[b.name] = summary
    table = paper_table(summaries, {b.name: b.num_samples for b in items})
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(table, protocol))
    if flat:
        return summaries[items[0].name]
    aggregate = {**table, "config": config}
    _write_json(os.path.join(output_dir, "summary.json"), aggregate)
    return aggregate


def _check_options(protocol, batch_size, num_subsets, max_problems, num_samples, max_new_tokens, temperature, top_p):
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` (--protocol) must be one of {list(PROTOCOLS)}, got {protocol!r}.")
    for name, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
        ("num_subsets", num_subsets),
        ("max_problems", max_problems),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}.")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"`temperature` (--temperature) must be > 0 (sampling), got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"`top_p` (--top-p) must be in (0, 1], got {top_p}.")


def _named_dataset(dataset: str) -> Benchmark:
    """`--dataset X` as a benchmark named after the file or Hub dataset (the name picks the paper's n)."""
    return Benchmark((_base_name(dataset) or str(dataset)).replace(":", "_"), str(dataset))


def _base_name(source: str) -> str:
    """The last part of a path or Hub id, without its extension: `data/amc23.jsonl` -> `amc23`."""
    return os.path.splitext(str(source).rstrip("/").split("/")[-1])[0]


def _protocol_num_samples(protocol: str, benchmark: Benchmark) -> int:
    if protocol != "paper":
        return DEFAULT_SAMPLING["num_samples"]
    key = paper_benchmark_key(benchmark.name) or paper_benchmark_key(benchmark.source)
    if key is None:
        raise ValueError(
            f"`--protocol paper` sets n for MATH500, AIME24, AIME25, AMC23 and OlympiadBench only; benchmark "
            f"{benchmark.name!r} is none of them: give its n ({benchmark.name}={benchmark.source}:N, or --num-samples N)."
        )
    return PAPER_NUM_SAMPLES[key]


def _saved_settings(model_path: str) -> SelfRewardSettings | None:
    try:
        return SelfRewardSettings.from_pretrained(model_path)
    except FileNotFoundError:
        return None


def _prompt_settings(
    saved: SelfRewardSettings | None,
    items: Sequence[Benchmark],
    system_prompt: str | None,
    instruction: str | None,
    separator: str | None,
    chat_template_kwargs: dict | None,
    dataset_seed: int | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The prompt settings to use, each from the argument, else the model's saved training settings, else the default.

    Also returns where each came from ("argument", "model" or "default"), recorded in the summary.
    """
    trained = saved.prompt if saved is not None else None
    default_instruction_ = default_instruction(items[0].source) if len(items) == 1 else PAPER_INSTRUCTION
    candidates = {
        "system_prompt": (system_prompt, trained.system_prompt if trained else None, None),
        "instruction": (instruction, trained.instruction if trained else None, default_instruction_),
        "instruction_separator": (separator, trained.instruction_separator if trained else None, "\n"),
        "chat_template_kwargs": (chat_template_kwargs, saved.chat_template_kwargs if saved else None, None),
        "dataset_seed": (dataset_seed, trained.dataset_seed if trained else None, 0),
    }
    values, sources = {}, {}
    for key, (given, from_model, default) in candidates.items():
        if given is not None:
            values[key], sources[key] = given, "argument"
        elif from_model is not None or (key == "system_prompt" and trained is not None):
            values[key], sources[key] = from_model, "model"
        else:
            values[key], sources[key] = default, "default"
    if len(items) > 1 and sources["instruction"] == "default":
        # Several problem sets, no saved instruction: each gets its own default (arithmetic's, or the paper's).
        values["instruction"] = None
    return values, sources


def _prepare_output(
    output_dir: str, run: dict, dirs: dict[str, str], totals: dict[str, int], overwrite: bool
) -> dict[str, int]:
    """Check the output folder against `run` and return, per benchmark, the samples already there to resume from.

    Same arguments: resume (incomplete last batches are dropped). Another run's samples: refused unless `overwrite`,
    which removes the files this module writes (and nothing else). Nothing is written before all checks passed.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` (--output-dir) {output_dir!r} is a file, not a folder.")
    parent = output_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`output_dir` (--output-dir) {output_dir!r} cannot be written (no permission in {parent}).")
    previous = _read_json(os.path.join(output_dir, RUN_FILE))
    leftovers = [os.path.join(d, n) for d in {output_dir, *dirs.values()} for n in _OUTPUT_FILES]
    leftovers = [p for p in leftovers if os.path.exists(p)]
    if previous != run and (previous is not None or leftovers):
        if not overwrite:
            why = _changed(previous, run) if previous is not None else "it was written without a run record"
            raise ValueError(
                f"`output_dir` (--output-dir) {output_dir!r} holds the samples of another evaluation ({why}). Use "
                "another --output-dir, or pass --overwrite to replace them."
            )
        old_dirs = [os.path.join(output_dir, b["name"]) for b in (previous or {}).get("benchmarks", [])]
        for folder in {output_dir, *dirs.values(), *old_dirs}:
            for name in _OUTPUT_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
    for folder in dirs.values():
        os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(output_dir, RUN_FILE), run)
    return {
        name: _keep_complete_batches(os.path.join(folder, "samples.jsonl"), run["batch_size"], totals[name])
        for name, folder in dirs.items()
    }


def _changed(previous: dict, run: dict) -> str:
    keys = [k for k in run if previous.get(k) != run[k]] + [k for k in previous if k not in run]
    key = keys[0]
    if key == "benchmarks":
        return f"argument `benchmarks` changed: {_benchmark_specs(previous.get(key))} -> {_benchmark_specs(run[key])}"
    return f"argument `{key}` changed: {previous.get(key)!r} -> {run.get(key)!r}"


def _benchmark_specs(benchmarks: Any) -> str:
    return ", ".join(f"{b['name']}={b['source']}:{b['num_samples']}" for b in benchmarks or [])


def _keep_complete_batches(path: str, batch_size: int, total: int) -> int:
    """Cut `samples.jsonl` after its last complete batch (a killed run can leave a half batch or half line)."""
    if not os.path.isfile(path):
        return 0
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n"):
                break
            lines.append(line)
    keep = total if len(lines) >= total else len(lines) - len(lines) % batch_size
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:keep])
    return keep


def _sample_benchmark(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    benchmark: Benchmark,
    problems: list[dict],
    folder: str,
    done: int,
    protocol: str,
    prompt: dict[str, Any],
    *,
    batch_size: int,
    seed: int,
    progress: bool,
    **generation: Any,
) -> list[dict]:
    """Sample what `samples.jsonl` lacks, appending each batch as it is done, then return every record of it."""
    instruction = prompt["instruction"] if prompt["instruction"] is not None else default_instruction(benchmark.source)
    conversations = [
        make_conversation(p["problem"], prompt["system_prompt"], instruction, prompt["instruction_separator"])
        for p in problems
    ]
    path = os.path.join(folder, "samples.jsonl")
    total = len(problems) * benchmark.num_samples
    batches = iter_generate_with_self_rewards(
        model,
        tokenizer,
        conversations,
        benchmark.num_samples,
        settings=settings,
        batch_size=batch_size,
        chat_template_kwargs=prompt["chat_template_kwargs"],
        start=done,
        seed=seed,
        **generation,
    )
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm(total=total, initial=done, desc=benchmark.name, unit="sample", disable=not progress) as bar,
    ):
        for batch in batches:
            rows = [_graded(problems[s.prompt_index], s, protocol) for s in batch]
            if protocol == "paper":
                _paper_conventions(model, tokenizer, settings, conversations, batch, rows, prompt)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(rows))
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    add_answer_agreement(records)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)
    return records


def _graded(problem: dict, s: ScoredCompletion, protocol: str) -> dict:
    graded = (
        grade_paper(s.text, str(problem["answer"])) if protocol == "paper" else grade(s.text, str(problem["answer"]))
    )
    return _record(problem, s, graded, keep_token_ids=False)


def _paper_conventions(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    conversations: list,
    batch: list[ScoredCompletion],
    rows: list[dict],
    prompt: dict[str, Any],
) -> None:
    """The official evaluation's conventions: a truncated response with a box is scored as if it had ended (EOS
    appended), and a response without a box gets score 0 and counts (`paper_convention` says which applied)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id in settings.eos_token_ids else settings.eos_token_ids[0]
    rescore = [i for i, r in enumerate(rows) if r["pred"] is not None and not r["finished"]]
    if rescore:
        scores = score_completions(
            model,
            tokenizer,
            [conversations[batch[i].prompt_index] for i in rescore],
            [batch[i].token_ids + [eos] for i in rescore],
            settings=settings,
            chat_template_kwargs=prompt["chat_template_kwargs"],
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


# ---------------------------------------------------------------------------------------------------- the table
TABLE_METRICS = {
    "accuracy": "Accuracy",
    "sv_f1_paper": "Self-verification F1",
    "auroc": "AUROC",
    "ece": "ECE",
}


def paper_table(summaries: dict[str, dict], num_samples: dict[str, int]) -> dict[str, Any]:
    """Per benchmark accuracy, self-verification F1 (the paper's), AUROC and ECE, and their plain average.

    The average of a metric is over all benchmarks (as the paper's "Avg."), `None` if one of them has none.
    """
    rows = {
        name: {
            "n": num_samples[name],
            "n_problems": s["n_problems"],
            "n_samples": s["n_samples"],
            **{key: s.get(key) for key in TABLE_METRICS},
        }
        for name, s in summaries.items()
    }
    average = {}
    for key in TABLE_METRICS:
        values = [row[key] for row in rows.values()]
        average[key] = None if None in values or not values else sum(values) / len(values)
    return {"benchmarks": rows, "average": average}


def results_markdown(table: dict[str, Any], protocol: str) -> str:
    """The paper's table layout: one column per benchmark and "Avg.", one row per metric (accuracy and F1 in %)."""
    names = list(table["benchmarks"])
    lines = [
        f"# Evaluation results (protocol: {protocol})",
        "",
        "| | " + " | ".join(f"{n} (n={table['benchmarks'][n]['n']})" for n in names) + " | Avg. |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for key, label in TABLE_METRICS.items():
        percent = key in ("accuracy", "sv_f1_paper")
        cells = [table["benchmarks"][n][key] for n in names] + [table["average"][key]]
        lines.append(
            f"| {label}{' (%)' if percent else ''} | " + " | ".join(_md_cell(v, percent) for v in cells) + " |"
        )
    lines += [
        "",
        "Accuracy: mean over all samples. Self-verification F1: 2 TPR TNR / (TPR + TNR) at r_s > 0.5 (the paper's). "
        "ECE: 10 equal-width bins of clamp(r_s, 0, 1). Avg.: the plain mean over the benchmarks.",
    ]
    return "\n".join(lines) + "\n"


def _md_cell(value: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _png(output_dir: str | os.PathLike, name: str) -> str:
    return os.path.join(output_dir, f"{name}.png")
