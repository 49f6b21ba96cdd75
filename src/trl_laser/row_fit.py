"""After training: fit z_c's output row to the final model's own answers, so that its one-token score ranks them.

During training z_c's row chases a moving model: it is fitted to EOS states of policies up to many steps old, with
forgetting, and one damped step at a time. On a trained model the row then ranks the answers to one problem worse
than a fit of that same model's states does (docs/miniature.md, "Third round"). `fit_row` samples the final model
on training problems, reads each finished completion's EOS state and log pi(z_c) (the probe's forward), and solves
LaSeR's class-balanced MSE for the row in closed form: one Gauss-Newton step from the current row
(`core.least_squares_row_step`), optionally with the part between problems down-weighted
(`core.group_centred_system`). The ridge and that weight are chosen by cross-validation grouped by problem text
(copies of a problem in one fold: `evaluation.summary.problem_groups`), on those training samples only.

Nothing else changes: the score stays `beta_v * (log pi(z_c | x, y, EOS) - c_ref)` read from the saved model, with
the same c_ref and beta_v, for one extra token. The math is in pure tensor functions (`row_fit_step`,
`refitted_logps`, `cross_validate_row_fit`); `fit_row` only wires sampling, the fit and saving.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from . import scoring
from .core import class_weights, group_centred_system, least_squares_row_step, self_reward_score
from .evaluation.prompts import Prompt
from .evaluation.sampling import Sampling, SelfRewardOverrides, default_device, load_for_sampling
from .evaluation.summary import BASELINES, problem_groups, ranking
from .hub import ROW_FIT_FILE, write_row_fit_card
from .probe import (
    _check_options,
    _probe_sampling,
    _sample,
    check_eos_logps,
    eos_sequences,
    finished_records,
    load_problems,
)
from .readout import grouped_folds
from .settings import resolve_settings


# Ridges relative to trace(B) / d (as the training-time row update). The step starts from the trained row, so a small
# ridge keeps it where the samples say nothing. On SmolLM2-135M's arithmetic miniature (2,000 samples, d = 576) the
# folds grouped by position chose the smallest of 0.003-1, and grouped by problem text (`problem_groups`) the largest,
# 1.0; on 512 distinct problems x 8 most choices were the smallest then, 0.0003, and the grid reaching 0.00001 (and
# the between weight 0.05) ranked within a problem 0.0055 better, nested over four trained models (docs/miniature.md,
# "fit-row's grid reaches smaller ridges").
DEFAULT_RIDGES = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# Weights of the part of the fit between problems: 1 is the pooled MSE, lower weights fit more of what separates
# answers to the same problem (0 alone would leave the level across problems unfitted, so it is not a default).
DEFAULT_BETWEEN_WEIGHTS = (1.0, 0.5, 0.25, 0.1, 0.05)
# Weight of keeping z_c's logit where it was at the positions that sample the answers (`row_fit_step`). Off by
# default: the saved generation config suppresses z_c instead (`_save`), which leaves every other token's sampling
# probability exactly as before the fit, where this term costs ranking (on the miniature's row-only model the
# cross-validated within-problem AUROC fell from 0.843 to 0.715 at weight 1). For samplers that ignore that config.
DEFAULT_OTHER_WEIGHT = 0.0


def row_fit_step(
    states: torch.Tensor,
    logps: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    beta: float,
    ref: float,
    ridge: float,
    between_weight: float = 1.0,
    other_gram: torch.Tensor | None = None,
    other_weight: float = 0.0,
) -> torch.Tensor:
    """The change of z_c's row that solves LaSeR's class-balanced MSE on these samples (damped by `ridge`), while
    keeping z_c's logit where it was at the positions that sample the answers' tokens (weighted by `other_weight`).

    Args:
        states: `(N, d)` final hidden states at each completion's EOS (the state that predicts z_c).
        logps: `(N,)` log pi(z_c | x, y, EOS) under the current row.
        labels: `(N,)` verifier rewards in {0, 1}.
        groups: `(N,)` integer problem ids.
        beta, ref: beta_v and c_ref of the score.
        ridge: damping relative to trace(B) / d (`core.least_squares_row_step`).
        between_weight: weight of the part of the system between problems (`core.group_centred_system`).
        other_gram: `(d, d)` mean of `h h^T` over the final states of the positions that sample the answers (not the
            EOS's): a z_c logit raised there gets sampled inside answers. The objective adds
            `other_weight * mean_t (beta_v * step . h_t) ** 2`, in the score's units, so `other_weight` 1 weighs a
            move of the score z_c would have at those positions as the MSE weighs the score's error at the EOS.
        other_weight: that weight (0: no such term).

    Returns:
        `(d,)` the step, in float64.
    """
    system = row_fit_system(states, logps, labels, groups, beta, ref)
    return solve_row_fit(system, beta, ridge, between_weight, other_gram, other_weight)


def row_fit_system(
    states: torch.Tensor, logps: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, beta: float, ref: float
) -> tuple[torch.Tensor, ...]:
    """What `row_fit_step` solves, before its ridge and between weight: the gradient `u`, the matrix `B`, and each
    problem's sums (`core.group_centred_system`), in float64. Built once, it serves every cell of a grid."""
    states, logps, labels = states.double(), logps.double(), labels.double()
    coef = class_weights(labels, torch.ones_like(labels, dtype=torch.bool))[0].double()
    phi = (1 - logps.exp())[:, None] * states
    residual = self_reward_score(logps, ref, beta) - labels
    gram = (phi * coef[:, None]).T @ phi
    gradient = (coef * residual) @ phi
    ids, groups = torch.unique(groups, return_inverse=True)
    group_sums = torch.zeros(len(ids), phi.size(1), dtype=phi.dtype).index_add_(0, groups, phi * coef[:, None])
    group_weights = torch.zeros(len(ids), dtype=phi.dtype).index_add_(0, groups, coef)
    group_residuals = torch.zeros(len(ids), dtype=phi.dtype).index_add_(0, groups, coef * residual)
    return gradient, gram, group_sums, group_weights, group_residuals


def solve_row_fit(
    system: tuple[torch.Tensor, ...],
    beta: float,
    ridge: float,
    between_weight: float = 1.0,
    other_gram: torch.Tensor | None = None,
    other_weight: float = 0.0,
) -> torch.Tensor:
    """`row_fit_step` from its `row_fit_system`, for one ridge and between weight."""
    gradient, gram = group_centred_system(*system, between_weight)
    if other_gram is not None and other_weight > 0:
        gram = gram + other_weight * other_gram.double()
    return least_squares_row_step(gram, gradient, beta, ridge)


def refitted_logps(states: torch.Tensor, logps: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """log pi(z_c) once z_c's row moves by `step`, exactly, from the current log-prob and the EOS state.

    With `a = w . h` and the other logits fixed, `log pi(z_c) = a - log(exp(L) + exp(a))`; moving `a` by
    `delta = step . h` gives `log pi + delta - log(1 - p + p exp(delta))` (p = pi(z_c) now).
    """
    logps = logps.double()
    delta = states.double() @ step.double()
    return logps + delta - torch.log1p(logps.exp() * torch.expm1(delta))


def cross_validate_row_fit(
    states: torch.Tensor,
    logps: torch.Tensor,
    labels: Sequence[bool | int],
    groups: Sequence[Hashable],
    beta: float,
    ref: float,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    between_weights: Sequence[float] = DEFAULT_BETWEEN_WEIGHTS,
    folds: int = 5,
    seed: int = 0,
    other_gram: torch.Tensor | None = None,
    other_weight: float = 0.0,
) -> list[dict[str, Any]]:
    """For each (ridge, between weight): the out-of-fold scores' AUROC overall and within a problem.

    Folds hold whole problems (`readout.grouped_folds`): a row credited on other answers to a problem it was fitted
    on would be credited for recognising the problem. `choice` picks the best row of this table. The other positions'
    term (`row_fit_step`) reads no label, so every fold uses the one of all samples.
    """
    fold_of = torch.tensor(grouped_folds(groups, folds, seed, labels))
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    ids = torch.tensor([index[g] for g in groups])
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    systems = [
        row_fit_system(states[fold_of != k], logps[fold_of != k], y[fold_of != k], ids[fold_of != k], beta, ref)
        for k in range(folds)
    ]
    table = []
    for between in between_weights:
        for ridge in ridges:
            scores = torch.empty(len(y), dtype=torch.float64)
            for k in range(folds):
                test = fold_of == k
                step = solve_row_fit(systems[k], beta, ridge, between, other_gram, other_weight)
                scores[test] = refitted_logps(states[test], logps[test], step)
            rank = ranking(scores.tolist(), labels, groups)
            table.append(
                {
                    "ridge": ridge,
                    "between_weight": between,
                    "auroc": rank["auroc"],
                    "auroc_within_problem": rank["auroc_within_problem"],
                }
            )
    return table


def choice_value(row: dict[str, Any]) -> float:
    """What `choice` maximises: the mean of a table row's AUROC overall and within a problem (those known)."""
    known = [v for v in (row["auroc"], row["auroc_within_problem"]) if v is not None]
    return sum(known) / len(known) if known else -math.inf


def choice(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row of `cross_validate_row_fit`'s table with the best mean of the AUROC overall and within a problem:
    best-of-N and weighted voting need the second, a score read alone (or a threshold) needs the first."""
    return max(table, key=choice_value)


def answer_positions(
    model: Any,
    sequences: list[list[int]],
    completion_lengths: Sequence[int],
    token_id: int,
    pad_id: int,
    batch_size: int,
) -> dict[str, Any]:
    """z_c at the positions that sample each answer's tokens (the last prompt token's to the one before the EOS's),
    and at the EOS's, where the score is read.

    Returns, over the answers' positions, their final states (`states`, `(P, d)` float32), log pi(z_c) there
    (`logps`, float64) and the answer each belongs to (`answer`); `gram`, the mean of `h h^T` over those states
    (float64, for `row_fit_step`); `positions`, P; per answer `draws` and `max_logprob` (`zc_inside_answers`); and
    the EOS's final states (`eos_states`, `(N, d)` float32, as `scoring.last_position` reads them) and log pi(z_c)
    there (`eos_logps`), so that the fit forwards each answer once, and the positions' states give z_c there after
    the fit without another (`refitted_logps`). The answers to one prompt share its prefill
    (`scoring.forward_after_prompts`).
    """
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    eos_states = torch.zeros(len(sequences), head.weight.shape[1])
    eos_logps = [0.0] * len(sequences)
    states: list[torch.Tensor | None] = [None] * len(sequences)
    logps: list[torch.Tensor | None] = [None] * len(sequences)
    try:
        for rows, *batch in scoring.prompt_grouped_batches(sequences, completion_lengths, pad_id, batch_size):
            with torch.inference_mode():
                logits = scoring.forward_after_prompts(model, *batch).logits
            batch_logps = logits.float().log_softmax(-1)[..., token_id].double().cpu()
            hidden = captured[-1].float().cpu()
            captured.clear()
            for r, i in enumerate(rows):
                n = completion_lengths[i]  # positions 0..n-1 sample the answer's tokens, n is the EOS's
                states[i], logps[i] = hidden[r, :n], batch_logps[r, :n]
                eos_states[i], eos_logps[i] = hidden[r, n], float(batch_logps[r, n])
    finally:
        handle.remove()
    inside, inside_logps = torch.cat(states), torch.cat(logps)
    answer = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(completion_lengths))
    draws, max_logprob = zc_inside_answers(inside_logps, answer, len(sequences))
    return {
        "states": inside,
        "logps": inside_logps,
        "answer": answer,
        "gram": inside.double().T @ inside.double() / max(len(inside), 1),
        "positions": len(inside),
        "draws": draws,
        "max_logprob": max_logprob,
        "eos_states": eos_states,
        "eos_logps": eos_logps,
    }


def zc_inside_answers(logps: torch.Tensor, answer: torch.Tensor, n_answers: int) -> tuple[list[float], list[float]]:
    """Per answer, from log pi(z_c) at its positions (`answer` names each position's): the expected number of z_c
    tokens sampled inside it (the sum of pi(z_c)), and the largest log pi(z_c)."""
    draws = torch.zeros(n_answers, dtype=torch.float64).index_add_(0, answer, logps.double().exp())
    peak = torch.full((n_answers,), -math.inf, dtype=torch.float64)
    peak = peak.scatter_reduce(0, answer, logps.double(), reduce="amax")
    return draws.tolist(), peak.tolist()


def fit_row(
    model_name_or_path: str,
    dataset: str,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    dataset_config: str | None = None,
    max_problems: int | None = None,
    sampling: Sampling | None = None,
    prompt: Prompt | None = None,
    self_reward: SelfRewardOverrides | None = None,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    between_weights: Sequence[float] = DEFAULT_BETWEEN_WEIGHTS,
    other_weight: float = DEFAULT_OTHER_WEIGHT,
    folds: int = 5,
    device: str | None = None,
    progress: bool = True,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    hub_model_id: str | None = None,
    save_states: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Sample the model on training problems, fit z_c's row to its answers, save the model with it to `output_dir`.

    Sampling is the probe's (temperature 1, default 8 samples per problem), as the score is read. The ridge and the
    between weight are chosen by `cross_validate_row_fit` on these samples; the row is then fitted on all of them.
    A raised z_c logit inside an answer would get z_c sampled there (on the miniature's `laser` model, 10% of held-out
    answers no longer finished): the saved `generation_config.json` suppresses z_c (`suppress_tokens`), so that
    `generate` samples every other token with exactly the probabilities it had before the fit (the fit moves z_c's
    logit only), while the score, read from the raw logits after the EOS, is unaffected. `other_weight` instead keeps
    z_c's logit in place inside the answers (`row_fit_step`), for samplers that ignore that config; `row_fit.json`
    reports the expected number of z_c tokens sampled per answer, unsuppressed, before and after. `output_dir` gets the
    whole model (every file of a local model directory, the weights saved again) with the same self-reward settings,
    and `row_fit.json`: the choice, the table, and every signal on the fitting samples before and after. A folder that
    already holds files is refused unless `overwrite` (then the fit's files replace theirs). The model card gains a
    section on the fit (`trl_laser.hub.write_row_fit_card`; its code names `hub_model_id` when given, for a push with
    `trl_laser.hub.push_row_fit`). `save_states` names a file (outside the model's folder) for what the fit read: the
    EOS states, log pi(z_c), labels, problem ids and the other positions' Gram matrix (`load_fitting_states`), to
    study the fit's choice without sampling again. Bad input raises `ValueError` before the model loads.
    """
    sampling, self_reward = _probe_sampling(sampling), self_reward or SelfRewardOverrides()
    _check_options(sampling, max_problems, folds, [1.0], self_reward.self_reward_ref_constant)
    _check_grid(ridges, between_weights, other_weight)
    if os.path.abspath(output_dir) == os.path.abspath(model_name_or_path):
        raise ValueError(
            "`output_dir` (--output-dir) must differ from the model's directory: the fit never overwrites."
        )
    if not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(
            f"`output_dir` (--output-dir) {output_dir} already holds files (an earlier fit?): give another "
            "--output-dir, or pass --overwrite to replace them."
        )
    _check_states_file(save_states, output_dir, overwrite)
    columns = (problem_column, answer_column, dataset_config)
    prompt, _, problems = load_problems(model_name_or_path, dataset, split, columns, max_problems, prompt, folds)

    start = time.perf_counter()
    device = default_device(device)
    model, tokenizer = load_for_sampling(model_name_or_path, device)
    try:
        settings = resolve_settings(model, tokenizer, overrides=dataclasses.asdict(self_reward))
    except FileNotFoundError as err:
        raise ValueError(f"{err} `fit_row` fits the row of a LaSeR model's score.") from None
    conversations = [prompt.conversation(p["problem"], dataset) for p in problems]
    records = _sample(model, tokenizer, settings, problems, conversations, prompt, sampling, progress)
    finished = finished_records(records, sampling.max_new_tokens, folds)
    sequences = eos_sequences(tokenizer, finished, conversations, prompt)
    lengths = [len(r["token_ids"]) for r in finished]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else settings.eos_token_ids[0]
    token_id = settings.self_reward_token_id
    inside = answer_positions(model, sequences, lengths, token_id, pad_id, sampling.batch_size)
    check_eos_logps(inside["eos_logps"], finished, tolerance)
    states = inside["eos_states"]
    beta, ref = settings.self_reward_beta, settings.self_reward_ref_constant
    logps = torch.tensor([r["self_reward_logprob"] for r in finished], dtype=torch.float64)
    labels = [bool(r["correct"]) for r in finished]
    groups = problem_groups(finished)
    other = (inside["gram"], other_weight)
    table = cross_validate_row_fit(
        states, logps, labels, groups, beta, ref, ridges, between_weights, folds, sampling.seed, *other
    )
    chosen = choice(table)
    y = torch.tensor(labels, dtype=torch.float64)
    step = row_fit_step(
        states, logps, y, torch.tensor(groups), beta, ref, chosen["ridge"], chosen["between_weight"], *other
    )
    row = model.get_output_embeddings().weight
    with torch.no_grad():
        row[token_id] += step.to(device=row.device, dtype=row.dtype)
    fitted = refitted_logps(states, logps, step)
    draws_after, peak_after = zc_inside_answers(
        refitted_logps(inside["states"], inside["logps"], step), inside["answer"], len(finished)
    )
    _save(model, tokenizer, settings, model_name_or_path, output_dir)
    signals = {name: [r[name] for r in finished] for name in BASELINES}
    signals["self_reward_before"] = self_reward_score(logps, ref, beta).tolist()
    signals["self_reward_after"] = self_reward_score(fitted, ref, beta).tolist()
    result = {
        "model": model_name_or_path,
        "dataset": dataset,
        "split": split,
        "n_problems": len(problems),
        "n_samples": len(records),
        "n_finished": len(finished),
        "n_correct_finished": sum(labels),
        "chosen": chosen,
        "cross_validation": {"folds": folds, "table": table},
        "step_norm": float(step.norm()),
        "inside_answers": {
            "other_weight": other_weight,
            "positions": inside["positions"],
            "expected_zc_draws_per_answer": {
                "before": sum(inside["draws"]) / len(finished),
                "after": sum(draws_after) / len(finished),
            },
            "max_zc_logprob": {"before": max(inside["max_logprob"]), "after": max(peak_after)},
        },
        "fitting_samples": {name: ranking(values, labels, groups) for name, values in signals.items()},
        "sampling": {
            "num_samples": sampling.num_samples,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        },
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(output_dir, ROW_FIT_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    write_row_fit_card(output_dir, hub_model_id)
    if save_states is not None:
        fitting = {
            "states": states,
            "logps": logps,
            "labels": y,
            "groups": torch.tensor(groups),
            "other_gram": other[0],
            "mean_token_logprobs": torch.tensor(signals["mean_token_logprob"], dtype=torch.float64),
        }
        torch.save({**fitting, "beta": beta, "ref": ref, "folds": folds, "seed": sampling.seed}, save_states)
    return result


def load_fitting_states(path: str | os.PathLike) -> dict[str, Any]:
    """What `fit_row(save_states=...)` saved: `states` (N, d), `logps`, `labels`, `groups` (N,), `other_gram` (d, d),
    and `beta`, `ref`, `folds`, `seed`, the arguments `cross_validate_row_fit` and `row_fit_step` take; and
    `mean_token_logprobs` (N,), the free signal of the same answers (files saved before 2026-12-04 lack it)."""
    return torch.load(path, weights_only=True)


def _check_states_file(path: str | os.PathLike | None, output_dir: str | os.PathLike, overwrite: bool) -> None:
    if path is None:
        return
    inside = os.path.commonpath([os.path.abspath(path), os.path.abspath(output_dir)]) == os.path.abspath(output_dir)
    if inside:
        raise ValueError(
            f"`save_states` (--save-states) {path} is inside the output folder, which is the model to upload: "
            "give a file elsewhere."
        )
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"`save_states` (--save-states) {path} exists: give another file, or pass --overwrite.")


def _check_grid(ridges: Sequence[float], between_weights: Sequence[float], other_weight: float) -> None:
    if not ridges or any(not (r > 0 and math.isfinite(r)) for r in ridges):
        raise ValueError(f"The ridges (--ridges) must be finite numbers > 0, got {list(ridges)}.")
    if not between_weights or any(not 0 < b <= 1 for b in between_weights):
        raise ValueError(f"The between weights (--between-weights) must be in (0, 1], got {list(between_weights)}.")
    if not (other_weight >= 0 and math.isfinite(other_weight)):
        raise ValueError(f"`other_weight` (--other-weight) must be a finite number >= 0, got {other_weight}.")


def _save(model: Any, tokenizer: Any, settings: Any, source: str, output_dir: str | os.PathLike) -> None:
    """The model with its new row and z_c suppressed in its generation config, beside every other file of a local
    source directory and the same settings."""
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isdir(source):
        for name in os.listdir(source):
            weights = ".safetensors" in name or name.endswith((".gguf", ".pt")) or name == "pytorch_model.bin"
            if os.path.isfile(os.path.join(source, name)) and not weights:
                shutil.copy2(os.path.join(source, name), os.path.join(output_dir, name))
    config = model.generation_config
    config.suppress_tokens = sorted({*(config.suppress_tokens or []), settings.self_reward_token_id})
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    settings.save_pretrained(output_dir)


def format_row_fit(result: dict[str, Any]) -> str:
    """`fit_row`'s result as text: the samples, the cross-validated choice, and the fitting samples' rankings."""
    chosen, cv = result["chosen"], result["cross_validation"]
    lines = [
        f"{result['model']} on {result['dataset']} ({result['split']}): {result['n_problems']} problems, "
        f"{result['n_finished']} finished samples ({result['n_correct_finished']} correct)",
        f"{cv['folds']}-fold cross-validation grouped by problem (out-of-fold AUROC, overall / within a problem):",
    ]
    for row in cv["table"]:
        mark = " <- chosen" if row == chosen else ""
        lines.append(
            f"  ridge {row['ridge']:<7g} between weight {row['between_weight']:<5g} "
            f"{_fmt(row['auroc'])} / {_fmt(row['auroc_within_problem'])}{mark}"
        )
    lines.append("on the fitting samples (in-sample for the new row), overall / within a problem:")
    for name, rank in result["fitting_samples"].items():
        lines.append(f"  {name:20s} {_fmt(rank['auroc'])} / {_fmt(rank['auroc_within_problem'])}")
    inside = result["inside_answers"]
    draws, peak = inside["expected_zc_draws_per_answer"], inside["max_zc_logprob"]
    lines.append(
        f"z_c inside the answers ({inside['positions']} positions, weight {inside['other_weight']:g}): expected draws "
        f"per answer {draws['before']:.2e} -> {draws['after']:.2e}, largest log-prob {peak['before']:.2f} -> "
        f"{peak['after']:.2f}"
    )
    lines.append(f"Wrote the model with z_c's new row (step norm {result['step_norm']:.4g}) and {ROW_FIT_FILE}.")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"
