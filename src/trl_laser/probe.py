"""Before training: does a model's EOS state already know whether its answer is right, and how good are free signals?

LaSeR teaches a model to put "my answer is right" into one logit, z_c's, read at the position right after EOS. How far
that can go for a model and a task can be measured before any training (`trl-laser probe` runs `run_probe`):

- the ceiling: a linear read-out (L2-regularised logistic regression) of the final hidden state at the EOS position,
  the very state from which the model predicts z_c, cross-validated with folds grouped by problem. Training z_c's
  output row alone can at best reach such a read-out; a LaSeR score above it needs a better representation;
- the free confidence signals every sample has without training: mean and minimum token log-prob of the completion,
  and the agreement of its answer with the other samples of its problem. A LaSeR score that does not beat them is
  not worth its training;
- the current z_c score and the statistics of log pi(z_c | x, y, EOS) (the c_ref of a constant-reference run).

Every signal is ranked on the finished completions only (those with an EOS state and a z_c score): AUROC overall,
within a problem (pairs of one problem: what a signal that only knows how hard a problem is cannot do) and per
difficulty band. The other functions here are pure functions of features, labels and problem ids.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from .core import self_reward_score
from .data import default_instruction, load_problems, make_conversation
from .evaluation import BASELINES, band_names, ranking, sample_records, signal_table
from .metrics import self_verification_metrics
from .models import load_model_and_tokenizer
from .scoring import last_position, resolve_settings, tokenize_prompt
from .settings import SELF_REWARD_CONFIG_NAME


# Inverse L2 strengths tried for the read-out (scikit-learn's C on standardised features): from a read-out that can
# only use a few strong directions to one that can fit any of the hidden size's. The best is chosen per outer fold by
# the balanced log-loss of an inner grouped split of its training part, so the reported AUROC never sees the samples
# that chose C. (On SmolLM2-135M-Instruct's 576-wide EOS states with ~400 training samples the choice is 0.003.)
DEFAULT_C_VALUES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# The signals, in the table's order, with what each row means.
SIGNALS = {
    "mean_token_logprob": "mean token log-prob",
    "min_token_logprob": "min token log-prob",
    "answer_agreement": "answer agreement",
    "self_reward": "z_c score (now)",
    "eos_readout": "EOS-state read-out (ceiling)",
}


def grouped_folds(
    groups: Sequence[Hashable], num_folds: int, seed: int = 0, labels: Sequence[bool | int] | None = None
) -> list[int]:
    """The fold of each sample, all samples of a group (a problem) in the same fold; stratified when `labels` given.

    A read-out validated on other samples of a problem it was trained on would be credited for recognising the
    problem. Groups are shuffled with `seed`, sorted by their fraction of correct samples when `labels` are given
    (a stable sort: random order among equals), and dealt in consecutive blocks of `num_folds`, each block to the
    folds in a random order. So every fold has the same number of groups give or take one, and, stratified, about
    the same share of correct samples: pooled out-of-fold AUROCs are biased low when the folds' class balance
    differs (a read-out trained on fewer correct samples than its test fold has scores that fold lower).
    """
    unique = list(dict.fromkeys(groups))
    if num_folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 folds, got {num_folds}.")
    if len(unique) < num_folds:
        raise ValueError(f"{len(unique)} problems cannot fill {num_folds} folds grouped by problem: use fewer folds.")
    rng = random.Random(seed)
    rng.shuffle(unique)
    if labels is not None:
        if len(labels) != len(groups):
            raise ValueError(f"Got {len(groups)} groups but {len(labels)} labels.")
        correct = collections.Counter(g for g, y in zip(groups, labels) if y)
        size = collections.Counter(groups)
        unique.sort(key=lambda g: correct[g] / size[g])
    fold_of = {}
    for start in range(0, len(unique), num_folds):
        block = unique[start : start + num_folds]
        for group, fold in zip(block, rng.sample(range(num_folds), len(block))):
            fold_of[group] = fold
    return [fold_of[group] for group in groups]


@dataclasses.dataclass
class LinearReadout:
    """A fitted logistic regression on standardised features: p(correct | h) = sigmoid(((h - mean) / scale) . w + b)."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """p(correct) of each row of `features`."""
        z = (features.to(torch.float64) - self.mean) / self.scale
        return torch.sigmoid(z @ self.weight + self.bias)


def fit_logistic(
    features: torch.Tensor, labels: Sequence[bool | int], c: float, balanced: bool = True, max_iter: int = 500
) -> LinearReadout:
    """L2-regularised logistic regression: minimises mean(v_i * log-loss_i) + ||w||^2 / (2 C n), bias not penalised.

    With `balanced`, v_i are LaSeR's class weights (`(N_c + N_i) / (2 N_c)` for correct samples, `(N_c + N_i) /
    (2 N_i)` for incorrect ones), so that p > 0.5 is the balanced decision the paper's F1 scores, as LaSeR's
    class-balanced MSE makes r_s > 0.5 one; otherwise v_i = 1. That is scikit-learn's `LogisticRegression(C=c,
    class_weight="balanced")` objective divided by C n. Features are standardised with the training data's mean and
    std (so C means the same for any hidden size and scale); full-batch L-BFGS in float64.
    """
    y = torch.tensor([float(bool(v)) for v in labels], dtype=torch.float64)
    if len(y) != len(features):
        raise ValueError(f"Got {len(features)} feature rows but {len(y)} labels.")
    if not 0 < y.mean() < 1:
        raise ValueError("A logistic read-out needs both classes among its training samples.")
    if not c > 0:
        raise ValueError(f"The inverse regularisation strength C must be > 0, got {c}.")
    x = features.detach().to(torch.float64).clone()  # a plain tensor, also when made under inference mode
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    n_correct = float(y.sum())
    if balanced:
        sample_weight = torch.where(y > 0, len(y) / (2 * n_correct), len(y) / (2 * (len(y) - n_correct)))
        start_bias = 0.0
    else:
        sample_weight = torch.ones_like(y)
        start_bias = math.log(n_correct / (len(y) - n_correct))
    weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(start_bias, dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (2 * c * len(y))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y, weight=sample_weight)
        loss = loss + penalty * weight.dot(weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearReadout(mean=mean, scale=scale, weight=weight.detach(), bias=float(bias.detach()))


def _fit_predict(x: torch.Tensor, y: list[int], test: torch.Tensor, c: float) -> list[float]:
    """Probabilities for `test` from a read-out fitted on (x, y); a single-class training part predicts its class."""
    if len(set(y)) < 2:
        return [float(y[0])] * len(test)
    return fit_logistic(x, y, c).probabilities(test).tolist()


def _cross_validate(x: torch.Tensor, y: list[int], folds: list[int], c: float) -> list[float]:
    probs = [0.0] * len(y)
    for k in sorted(set(folds)):
        train = [i for i, f in enumerate(folds) if f != k]
        test = [i for i, f in enumerate(folds) if f == k]
        for i, p in zip(test, _fit_predict(x[train], [y[i] for i in train], x[test], c)):
            probs[i] = p
    return probs


def _balanced_log_loss(probs: Sequence[float], labels: Sequence[int]) -> float:
    """Mean log-loss with LaSeR's class weights (the read-out's own objective, without the penalty)."""
    n, n_correct = len(labels), sum(labels)
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(p, 1e-12), 1 - 1e-12)
        total += -math.log(p) * n / (2 * n_correct) if y else -math.log(1 - p) * n / (2 * (n - n_correct))
    return total / n


def _choose_c(
    x: torch.Tensor, y: list[int], groups: list[Hashable], num_folds: int, c_values: Sequence[float], seed: int
) -> float:
    """The C with the lowest out-of-fold balanced log-loss of an inner grouped split (ties: stronger regularisation).

    Log-loss, a proper score, picks C more steadily than the AUROC of a few hundred samples does.
    """
    candidates = sorted(c_values)
    unique = len(set(groups))
    if len(candidates) == 1 or unique < 2 or len(set(y)) < 2:
        return candidates[0]
    inner = grouped_folds(groups, min(max(2, num_folds - 1), unique), seed + 1, y)
    losses = [_balanced_log_loss(_cross_validate(x, y, inner, c), y) for c in candidates]
    return candidates[losses.index(min(losses))]


def readout_probabilities(
    features: torch.Tensor,
    labels: Sequence[bool | int],
    groups: Sequence[Hashable],
    num_folds: int = 5,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Out-of-fold p(correct) of every sample from a linear read-out of `features`, folds grouped by `groups`.

    Each sample's probability comes from a read-out that saw no sample of its group, with C chosen on the training
    folds only (`DEFAULT_C_VALUES`); folds are stratified by correctness (`grouped_folds`). Returns the probabilities
    and the C chosen for each fold.
    """
    y = [int(bool(v)) for v in labels]
    if not len(y) == len(features) == len(groups):
        raise ValueError(f"Got {len(features)} feature rows, {len(y)} labels and {len(groups)} groups.")
    if not c_values or any(not c > 0 for c in c_values):
        raise ValueError(f"The read-out's C values must be > 0, got {list(c_values)}.")
    folds = grouped_folds(groups, num_folds, seed, y)
    probs = [0.0] * len(y)
    chosen = []
    for k in range(num_folds):
        train = [i for i, f in enumerate(folds) if f != k]
        test = [i for i, f in enumerate(folds) if f == k]
        y_train = [y[i] for i in train]
        c = _choose_c(features[train], y_train, [groups[i] for i in train], num_folds, c_values, seed)
        for i, p in zip(test, _fit_predict(features[train], y_train, features[test], c)):
            probs[i] = p
        chosen.append(c)
    return probs, chosen


def auroc_table(
    signals: dict[str, Sequence[float | None]],
    labels: Sequence[bool | int],
    problems: Sequence[Hashable],
    bands: Sequence[str | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each signal: AUROC overall, within a problem, and per difficulty band (`evaluation.ranking`)."""
    return {name: ranking(values, labels, problems, bands) for name, values in signals.items()}


def c_ref_statistics(logps: Sequence[float]) -> dict[str, float | int]:
    """Mean, std, min and max of log pi(z_c | x, y, EOS) over the finished completions."""
    return {
        "n_finished": len(logps),
        "mean": statistics.fmean(logps),
        "std": statistics.stdev(logps) if len(logps) > 1 else 0.0,
        "min": min(logps),
        "max": max(logps),
    }


def format_probe_table(result: dict[str, Any]) -> str:
    """The probe's result as text: counts, c_ref, then one row per signal (AUROC overall, within problem, bands)."""
    counts, ref, readout = result["counts"], result["c_ref"], result["readout"]
    lines = [
        f"{result['model']} on {result['dataset']}: {counts['n_problems']} problems x {result['config']['num_samples']} "
        f"samples, {counts['n_finished']} finished ({counts['n_correct_finished']} correct); accuracy "
        f"{_fmt(counts['accuracy'])} (finished: {_fmt(counts['accuracy_finished'])})",
        f"log pi({result['self_reward_token']} | x, y, EOS): mean {ref['mean']:.4f} +- {ref['std']:.4f} (std), min "
        f"{ref['min']:.4f}, max {ref['max']:.4f}; c_ref used {ref['used']:.4f} ({ref['source']})",
        "",
        f"ranking of right above wrong on the {counts['n_finished']} finished samples (an unrelated score: 0.5 +- "
        f"{_fmt(counts['auroc_null_std'])}):",
        signal_table({SIGNALS[name]: values for name, values in result["signals"].items()}),
        "",
        f"read-out: {readout['folds']}-fold grouped by problem, C per fold {readout['c_per_fold']}; at p > 0.5: paper F1 "
        f"{_fmt(readout['sv_f1_paper'])}, binary F1 {_fmt(readout['sv_f1_binary'])}, accuracy "
        f"{_fmt(readout['sv_accuracy'])}, ECE {_fmt(readout['ece'])}",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_probe(
    model_name_or_path: str,
    dataset: str,
    output_dir: str | os.PathLike | None = None,
    *,
    split: str = "test",
    problem_column: str = "problem",
    answer_column: str = "answer",
    num_samples: int = 8,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    seed: int = 0,
    system_prompt: str | None = None,
    instruction: str | None = None,
    max_problems: int | None = None,
    self_reward_token: str | int | None = None,
    self_reward_ref_constant: float | None = None,
    folds: int = 5,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    device: str | None = None,
    progress: bool = True,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Sample, read each finished completion's EOS state, rank every signal; write `probe.json` and `samples.jsonl`.

    Sampling is at temperature 1 with `evaluation.sample_records` (prompts as in training and `trl-laser eval`). The
    EOS states come from one batched forward over prompt + completion (last position only), whose log pi(z_c) must
    equal the one captured during generation within `tolerance` (else a `RuntimeError`: the state would not be the
    one that predicts z_c). c_ref defaults to the measured mean. Bad input raises `ValueError` before the model loads.
    """
    for name, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
        ("max_problems", 1 if max_problems is None else max_problems),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` (--folds) must be an integer >= 2, got {folds!r}.")
    if not c_values or any(not c > 0 for c in c_values):
        raise ValueError(f"The read-out's C values (--readout-c) must be > 0, got {list(c_values)}.")
    if self_reward_ref_constant is not None and not (math.isfinite(self_reward_ref_constant)):
        raise ValueError(f"`self_reward_ref_constant` must be a finite number, got {self_reward_ref_constant}.")
    data = load_problems(dataset, split=split, problem_column=problem_column, answer_column=answer_column)
    if max_problems is not None:
        data = data.select(range(min(max_problems, len(data))))
    problems = data.to_list()
    if len(problems) < folds:
        raise ValueError(f"{len(problems)} problems cannot fill {folds} folds grouped by problem: use more problems.")
    if instruction is None:
        instruction = default_instruction(dataset)

    from transformers import set_seed

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype=torch.float32 if device == "cpu" else None)
    model.to(device)
    try:
        # The raw log-prob is what is captured; c_ref only shifts the score, so a placeholder stands in until measured.
        settings = resolve_settings(
            model,
            tokenizer,
            self_reward_token=self_reward_token,
            self_reward_ref_constant=0.0 if self_reward_ref_constant is None else self_reward_ref_constant,
        )
    except FileNotFoundError:
        raise ValueError(
            f"{model_name_or_path} has no {SELF_REWARD_CONFIG_NAME}: give the token to probe (--self-reward-token)."
        ) from None

    load_seconds = time.perf_counter() - start
    set_seed(seed)
    records = sample_records(
        model,
        tokenizer,
        problems,
        num_samples,
        system_prompt=system_prompt,
        instruction=instruction,
        batch_size=batch_size,
        progress=progress,
        keep_token_ids=True,
        settings=settings,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
    )
    generation_seconds = time.perf_counter() - start - load_seconds
    finished = [r for r in records if r["finished"]]
    if not finished:
        raise ValueError(
            f"None of the {len(records)} completions ended with EOS within {max_new_tokens} tokens: there is no EOS "
            "state to read. Raise --max-new-tokens."
        )
    problem_ids = sorted({r["problem_index"] for r in finished})
    if len(problem_ids) < folds:
        raise ValueError(
            f"Only {len(problem_ids)} problems have a finished completion, fewer than the {folds} folds: use more "
            "problems, samples or tokens."
        )

    prompt_ids = {
        p: tokenize_prompt(tokenizer, make_conversation(problems[p]["problem"], system_prompt, instruction))
        for p in problem_ids
    }
    sequences = [prompt_ids[r["problem_index"]] + r["token_ids"] for r in finished]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else settings.eos_token_ids[0]
    model.eval()
    with torch.inference_mode():
        logps, states = last_position(
            model, sequences, settings.self_reward_token_id, pad_id, batch_size, hidden_states=True
        )
    captured = [r["self_reward_logprob"] for r in finished]
    gap = max(abs(a - b) for a, b in zip(logps, captured))
    if gap > tolerance:
        raise RuntimeError(
            f"log pi(z_c) from the forward over prompt + completion differs from the one captured during generation "
            f"by up to {gap:.2e} (> {tolerance:g}): the EOS states read are not the ones that predict z_c."
        )
    forward_seconds = time.perf_counter() - start - load_seconds - generation_seconds

    ref = c_ref_statistics(captured)
    c_ref = ref["mean"] if self_reward_ref_constant is None else float(self_reward_ref_constant)
    ref.update(used=c_ref, source="measured mean" if self_reward_ref_constant is None else "given")
    for r in finished:
        logp = torch.tensor(r["self_reward_logprob"], dtype=torch.float64)
        r["self_reward"] = float(self_reward_score(logp, c_ref, settings.self_reward_beta))

    labels = [bool(r["correct"]) for r in finished]
    groups = [r["problem_index"] for r in finished]
    has_bands = any(r.get("difficulty") is not None for r in finished)
    bands = [r.get("difficulty") for r in finished] if has_bands else None
    probs, chosen = readout_probabilities(states, labels, groups, folds, c_values, seed)
    for r in records:
        r["eos_readout"] = None
    for r, p in zip(finished, probs):
        r["eos_readout"] = p
    signals = {name: [r[name] for r in finished] for name in (*BASELINES, "self_reward", "eos_readout")}
    sv = self_verification_metrics(probs, labels)
    n_correct = sum(labels)
    n_incorrect = len(labels) - n_correct
    result: dict[str, Any] = {
        "model": model_name_or_path,
        "dataset": dataset,
        "self_reward_token": settings.self_reward_token,
        "self_reward_token_id": settings.self_reward_token_id,
        "counts": {
            "n_problems": len(problems),
            "n_samples": len(records),
            "n_finished": len(finished),
            "n_correct": sum(bool(r["correct"]) for r in records),
            "n_correct_finished": n_correct,
            "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
            "accuracy_finished": n_correct / len(finished),
            # The std of the AUROC of a score unrelated to correctness (Mann-Whitney U under the null).
            "auroc_null_std": math.sqrt((len(labels) + 1) / (12 * n_correct * n_incorrect))
            if n_correct and n_incorrect
            else None,
        },
        "c_ref": ref,
        "bands": band_names(bands) if bands is not None else None,
        "signals": auroc_table(signals, labels, groups, bands),
        "readout": {
            "folds": folds,
            "c_values": sorted(c_values),
            "c_per_fold": chosen,
            "hidden_size": int(states.shape[1]),
            **{k: sv[k] for k in ("sv_f1_paper", "sv_f1_binary", "sv_accuracy", "tpr", "tnr", "ece")},
        },
        "config": {
            "split": split,
            "num_samples": num_samples,
            "max_new_tokens": max_new_tokens,
            "max_problems": max_problems,
            "seed": seed,
            "temperature": 1.0,
            "system_prompt": system_prompt,
            "instruction": instruction,
            "self_reward_beta": settings.self_reward_beta,
            "device": str(device),
        },
    }
    total = time.perf_counter() - start
    result["seconds"] = {
        "load": load_seconds,
        "generation": generation_seconds,
        "forward": forward_seconds,
        "readout": total - load_seconds - generation_seconds - forward_seconds,
        "total": total,
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
            for record in records:
                record.pop("token_ids")
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        with open(os.path.join(output_dir, "probe.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result
