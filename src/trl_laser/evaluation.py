"""Test-time evaluation of a LaSeR model: sample N solutions per problem, grade them, score them, vote, report.

`run_evaluation` is what `trl-laser eval` runs. Every number comes from one set of samples: the votes over 1..N
samples (inference-time scaling) are recomputed on random subsets of them, never regenerated. Each metric is also
reported on the "answer extracted" subset (the paper's "filtered" variant: samples whose answer could be read).
Beside the LaSeR score stand the free confidence signals every sample has without training (`BASELINES`: mean and
minimum token log-prob, agreement with the other samples), ranked on the same samples: a LaSeR score that does not
beat them is not worth its training.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .answers import extract_answer, is_correct
from .data import ARITHMETIC_DIFFICULTIES, PAPER_INSTRUCTION, default_instruction, load_problems, make_conversation
from .metrics import auroc, auroc_within_group, self_verification_metrics
from .models import load_model_and_tokenizer
from .scoring import generate_with_self_rewards, resolve_settings
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


def sample_records(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict],
    num_samples: int,
    *,
    system_prompt: str | None = None,
    instruction: str = PAPER_INSTRUCTION,
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
    prompts = [make_conversation(p["problem"], system_prompt, instruction) for p in problems]
    results = generate_with_self_rewards(
        model, tokenizer, prompts, num_samples, batch_size=batch_size, progress=progress, **kwargs
    )
    records = []
    total = len(problems) * num_samples
    with tqdm(total=total, desc="grading", unit="sample", disable=not progress) as bar:
        for problem, samples in zip(problems, results):
            rows = []
            for s in samples:
                pred, correct = grade(s.text, str(problem["answer"]))
                rows.append(
                    {
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
                )
                if problem.get("difficulty") is not None:
                    rows[-1]["difficulty"] = problem["difficulty"]
                if keep_token_ids:
                    rows[-1]["token_ids"] = s.token_ids
                bar.update(1)
            for row, agreement in zip(rows, answer_agreement([r["pred"] for r in rows])):
                row["answer_agreement"] = agreement
            records.extend(rows)
    return records


def run_evaluation(
    model_name_or_path: str,
    dataset: str,
    output_dir: str | os.PathLike,
    *,
    split: str = "test",
    problem_column: str = "problem",
    answer_column: str = "answer",
    num_samples: int = 4,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    system_prompt: str | None = None,
    instruction: str | None = None,
    max_problems: int | None = None,
    self_reward_token: str | int | None = None,
    self_reward_ref_constant: float | None = None,
    self_reward_beta: float | None = None,
    num_subsets: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on a problem set and write `samples.jsonl`, `summary.json` and the PNG plots.

    Prompts are built as in training: `make_conversation(problem, system_prompt, instruction)`, the instruction
    defaulting to the dataset's (`data.default_instruction`). Inputs are checked before any generation (a bad
    argument costs no model time). Returns the summary.
    """
    for name, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
        ("num_subsets", num_subsets),
        ("max_problems", 1 if max_problems is None else max_problems),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` (--temperature) must be > 0 (sampling), got {temperature}.")
    data = load_problems(dataset, split=split, problem_column=problem_column, answer_column=answer_column)
    if max_problems is not None:
        data = data.select(range(min(max_problems, len(data))))
    problems = data.to_list()
    if instruction is None:
        instruction = default_instruction(dataset)

    import torch
    from transformers import set_seed

    model, tokenizer = load_model_and_tokenizer(model_name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    overrides = {
        "self_reward_token": self_reward_token,
        "self_reward_ref_constant": self_reward_ref_constant,
        "self_reward_beta": self_reward_beta,
    }
    settings = resolve_settings(model, tokenizer, **overrides)  # fails before generating if there are none

    set_seed(seed)
    start = time.perf_counter()
    records = sample_records(
        model,
        tokenizer,
        problems,
        num_samples,
        system_prompt=system_prompt,
        instruction=instruction,
        batch_size=batch_size,
        progress=progress,
        settings=settings,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    seconds = time.perf_counter() - start

    summary = summarize(records, len(problems))
    curves = scaling_curves(records, num_samples, num_subsets=num_subsets, seed=seed)
    summary["scaling"] = curves
    summary["config"] = {
        "model": model_name_or_path,
        "dataset": dataset,
        "split": split,
        "num_samples": num_samples,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "system_prompt": system_prompt,
        "instruction": instruction,
        "self_reward": settings.to_dict(),
        "generation_seconds": seconds,
    }

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    plot_reliability(
        [r["self_reward"] for r in records], [r["correct"] for r in records], _png(output_dir, "reliability")
    )
    plot_scaling(curves, _png(output_dir, "scaling"))
    return summary


def _png(output_dir: str | os.PathLike, name: str) -> str:
    return os.path.join(output_dir, f"{name}.png")
