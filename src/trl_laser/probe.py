"""Before training: does a model's EOS state already know whether its answer is right, and how good are free signals?

LaSeR teaches a model to put "my answer is right" into one logit, z_c's, read at the position right after EOS. How far
that can go for a model and a task can be measured before any training (`trl-laser probe` runs `run_probe`):

- the ceiling: a linear read-out of the final hidden state at the EOS position, the very state from which the model
  predicts z_c, cross-validated with folds grouped by problem (`readout`). Training z_c's output row alone can at
  best reach such a read-out; a LaSeR score above it needs a better representation;
- the free confidence signals every sample has without training: mean and minimum token log-prob of the completion,
  and the agreement of its answer with the other samples of its problem. A LaSeR score that does not beat them is
  not worth its training;
- the current z_c score and the statistics of log pi(z_c | x, y, EOS) (the c_ref of a constant-reference run).

Every signal is ranked on the finished completions only (those with an EOS state and a z_c score): AUROC overall,
within a problem (pairs of one problem: what a signal that only knows how hard a problem is cannot do) and per
difficulty band. Problems are prompted as `trl-laser eval` prompts them: as the model was trained, when it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from . import scoring
from .core import self_reward_score
from .evaluation.prompts import Prompt, resolve_prompt, saved_settings
from .evaluation.protocol import Benchmark, load_benchmark
from .evaluation.report import signal_table
from .evaluation.sampling import (
    Sampling,
    SelfRewardOverrides,
    check_counts,
    default_device,
    load_for_sampling,
    sample_batches,
)
from .evaluation.summary import (
    BASELINES,
    add_answer_agreement,
    auroc_null_std,
    band_names,
    problem_groups,
    ranking,
)
from .metrics import self_verification_metrics
from .readout import DEFAULT_C_VALUES, readout_probabilities
from .ref_constant import c_ref_statistics
from .settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings, resolve_settings


# The signals, in the table's order, with what each row means.
SIGNALS = {
    "mean_token_logprob": "mean token log-prob",
    "min_token_logprob": "min token log-prob",
    "answer_agreement": "answer agreement",
    "self_reward": "z_c score (now)",
    "eos_readout": "EOS-state read-out (ceiling)",
}


def auroc_table(
    signals: dict[str, Sequence[float | None]],
    labels: Sequence[bool | int],
    problems: Sequence[Hashable],
    bands: Sequence[str | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each signal: AUROC overall, within a problem, and per difficulty band (`evaluation.ranking`)."""
    return {name: ranking(values, labels, problems, bands) for name, values in signals.items()}


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
    dataset_config: str | None = None,
    max_problems: int | None = None,
    sampling: Sampling | None = None,
    prompt: Prompt | None = None,
    self_reward: SelfRewardOverrides | None = None,
    folds: int = 5,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    device: str | None = None,
    progress: bool = True,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Sample, read each finished completion's EOS state, rank every signal; write `probe.json` and `samples.jsonl`.

    Sampling is at temperature 1 (default: 8 samples per problem, 1024 new tokens); prompts as in `trl-laser eval`,
    unset prompt settings are those saved with the model by training. The EOS states come from one batched forward
    over prompt + completion (last position only), whose log pi(z_c) must equal the one captured during generation
    within `tolerance` (else a `RuntimeError`: the state would not be the one that predicts z_c). c_ref defaults to
    the measured mean (`self_reward`). Bad input raises `ValueError` before the model loads.
    """
    sampling, self_reward = _probe_sampling(sampling), self_reward or SelfRewardOverrides()
    _check_options(sampling, max_problems, folds, c_values, self_reward.self_reward_ref_constant)
    columns = (problem_column, answer_column, dataset_config)
    prompt, origins, problems = load_problems(model_name_or_path, dataset, split, columns, max_problems, prompt, folds)

    start = time.perf_counter()
    device = default_device(device)
    model, tokenizer, settings = _load(model_name_or_path, device, self_reward)
    seconds = {"load": time.perf_counter() - start}
    conversations = [prompt.conversation(p["problem"], dataset) for p in problems]
    records = _sample(model, tokenizer, settings, problems, conversations, prompt, sampling, progress)
    seconds["generation"] = time.perf_counter() - start - sum(seconds.values())
    finished = finished_records(records, sampling.max_new_tokens, folds)
    states = _eos_states(model, tokenizer, settings, finished, conversations, prompt, sampling.batch_size, tolerance)
    seconds["forward"] = time.perf_counter() - start - sum(seconds.values())
    ref = self_reward.self_reward_ref_constant
    result = {
        "model": model_name_or_path,
        "dataset": dataset,
        **_rank(len(problems), records, finished, states, settings, ref, folds, c_values, sampling.seed),
        "config": {
            "split": split,
            **_config(sampling, max_problems, prompt, origins),
            "self_reward_beta": settings.self_reward_beta,
            "device": str(device),
        },
    }
    total = time.perf_counter() - start
    result["seconds"] = {**seconds, "readout": total - sum(seconds.values()), "total": total}
    if output_dir is not None:
        _write(output_dir, records, result)
    return result


def load_problems(
    model_name_or_path: str,
    dataset: str,
    split: str,
    columns: tuple[str, str, str | None],
    max_problems: int | None,
    prompt: Prompt | None,
    folds: int,
) -> tuple[Prompt, dict[str, str], list[dict]]:
    """The prompt settings (the model's saved ones unless given) with their origins, and the problems, enough of them
    to fill `folds` folds grouped by problem (else a `ValueError`). `columns`: the problem and answer columns and the
    dataset's configuration."""
    prompt, origins = resolve_prompt(saved_settings(model_name_or_path), prompt or Prompt(), [dataset])
    problem_column, answer_column, config = columns
    benchmark = Benchmark(
        dataset, dataset, split=split, problem_column=problem_column, answer_column=answer_column, config=config
    )
    problems = load_benchmark(benchmark, max_problems, prompt.dataset_seed)
    if len(problems) < folds:
        raise ValueError(f"{len(problems)} problems cannot fill {folds} folds grouped by problem: use more problems.")
    return prompt, origins, problems


def _config(sampling: Sampling, max_problems: int | None, prompt: Prompt, origins: dict[str, str]) -> dict[str, Any]:
    """How the samples were drawn and prompted, and where each prompt setting came from."""
    return {
        "num_samples": sampling.num_samples,
        "max_new_tokens": sampling.max_new_tokens,
        "max_problems": max_problems,
        "seed": sampling.seed,
        "temperature": sampling.temperature,
        **dataclasses.asdict(prompt),
        "settings_from": origins,
    }


def _probe_sampling(sampling: Sampling | None) -> Sampling:
    """The given sampling with the probe's defaults (8 samples per problem, 1024 new tokens), at temperature 1."""
    sampling = sampling or Sampling()
    if sampling.temperature not in (None, 1.0) or sampling.top_p not in (None, 1.0):
        raise ValueError("The probe samples at temperature 1 and top-p 1, as the score is read: leave them unset.")
    return dataclasses.replace(
        sampling,
        num_samples=8 if sampling.num_samples is None else sampling.num_samples,
        max_new_tokens=1024 if sampling.max_new_tokens is None else sampling.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
    )


def _check_options(
    sampling: Sampling,
    max_problems: int | None,
    folds: int,
    c_values: Sequence[float],
    self_reward_ref_constant: float | None,
) -> None:
    check_counts(
        {
            "num_samples": sampling.num_samples,
            "batch_size": sampling.batch_size,
            "max_new_tokens": sampling.max_new_tokens,
            "max_problems": max_problems,
        }
    )
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` (--folds) must be an integer >= 2, got {folds!r}.")
    if not c_values or any(not c > 0 for c in c_values):
        raise ValueError(f"The read-out's C values (--readout-c) must be > 0, got {list(c_values)}.")
    if self_reward_ref_constant is not None and not (math.isfinite(self_reward_ref_constant)):
        raise ValueError(f"`self_reward_ref_constant` must be a finite number, got {self_reward_ref_constant}.")


def _load(
    model_name_or_path: str, device: str, self_reward: SelfRewardOverrides
) -> tuple[Any, Any, SelfRewardSettings]:
    """The model (float32 on the CPU) and tokenizer, and the settings whose z_c is probed."""
    model, tokenizer = load_for_sampling(model_name_or_path, device)
    ref = self_reward.self_reward_ref_constant
    try:
        # The raw log-prob is what is captured; c_ref only shifts the score, so a placeholder stands in until measured.
        settings = resolve_settings(
            model,
            tokenizer,
            overrides={**dataclasses.asdict(self_reward), "self_reward_ref_constant": 0.0 if ref is None else ref},
        )
    except FileNotFoundError:
        raise ValueError(
            f"{model_name_or_path} has no {SELF_REWARD_CONFIG_NAME}: give the token to probe (--self-reward-token)."
        ) from None
    return model, tokenizer, settings


def _sample(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    problems: list[dict],
    conversations: list[list],
    prompt: Prompt,
    sampling: Sampling,
    progress: bool,
) -> list[dict]:
    """The graded records of every sample, with their generated ids; sampling continues from `sampling.seed`."""
    from transformers import set_seed

    set_seed(sampling.seed)
    batches = sample_batches(
        model,
        tokenizer,
        settings,
        problems,
        conversations,
        sampling.num_samples,
        batch_size=sampling.batch_size,
        chat_template_kwargs=prompt.chat_template_kwargs,
        keep_token_ids=True,
        progress=progress,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
    )
    records = [record for batch in batches for record in batch]
    add_answer_agreement(records)
    return records


def finished_records(records: list[dict], max_new_tokens: int, folds: int) -> list[dict]:
    """The finished records (those with an EOS state), when they span enough problems to fill the folds."""
    finished = [r for r in records if r["finished"]]
    if not finished:
        raise ValueError(
            f"None of the {len(records)} completions ended with EOS within {max_new_tokens} tokens: there is no EOS "
            "state to read. Raise --max-new-tokens."
        )
    num_problems = len(set(problem_groups(finished)))
    if num_problems < folds:
        have = "problem has" if num_problems == 1 else "problems have"
        raise ValueError(
            f"Only {num_problems} {have} a finished completion, fewer than the {folds} folds: use more problems, "
            "samples or tokens."
        )
    return finished


def eos_sequences(tokenizer: Any, finished: list[dict], conversations: list[list], prompt: Prompt) -> list[list[int]]:
    """Prompt + completion token ids of each finished record (the completion ends with its EOS)."""
    prompt_ids = {
        p: scoring.tokenize_prompt(tokenizer, conversations[p], prompt.chat_template_kwargs)
        for p in sorted({r["problem_index"] for r in finished})
    }
    return [prompt_ids[r["problem_index"]] + r["token_ids"] for r in finished]


def _eos_states(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings,
    finished: list[dict],
    conversations: list[list],
    prompt: Prompt,
    batch_size: int,
    tolerance: float,
) -> torch.Tensor:
    """The final hidden state at each finished completion's EOS, checked to be the one that predicted z_c."""
    sequences = eos_sequences(tokenizer, finished, conversations, prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else settings.eos_token_ids[0]
    model.eval()
    with torch.inference_mode():
        logps, states = scoring.last_position(
            model,
            sequences,
            settings.self_reward_token_id,
            pad_id,
            batch_size,
            hidden_states=True,
            completion_lengths=[len(r["token_ids"]) for r in finished],
        )
    check_eos_logps(logps, finished, tolerance)
    return states


def check_eos_logps(logps: Sequence[float], finished: list[dict], tolerance: float) -> None:
    """The forward's log pi(z_c) at each EOS must be the one captured while sampling: else its EOS states are not
    the ones that predict z_c (a different prompt, padding or position ids), and a read-out or fit of them is wrong."""
    gap = max(abs(a - r["self_reward_logprob"]) for a, r in zip(logps, finished))
    if gap > tolerance:
        raise RuntimeError(
            f"log pi(z_c) from the forward over prompt + completion differs from the one captured during generation "
            f"by up to {gap:.2e} (> {tolerance:g}): the EOS states read are not the ones that predict z_c."
        )


def _rank(
    num_problems: int,
    records: list[dict],
    finished: list[dict],
    states: torch.Tensor,
    settings: SelfRewardSettings,
    self_reward_ref_constant: float | None,
    folds: int,
    c_values: Sequence[float],
    seed: int,
) -> dict[str, Any]:
    """Score with c_ref (given, else the measured mean), fit the read-out, and rank every signal on `finished`."""
    ref = c_ref_statistics([r["self_reward_logprob"] for r in finished])
    c_ref = ref["mean"] if self_reward_ref_constant is None else float(self_reward_ref_constant)
    ref.update(used=c_ref, source="measured mean" if self_reward_ref_constant is None else "given")
    for r in finished:
        logp = torch.tensor(r["self_reward_logprob"], dtype=torch.float64)
        r["self_reward"] = float(self_reward_score(logp, c_ref, settings.self_reward_beta))
    labels = [bool(r["correct"]) for r in finished]
    groups = problem_groups(finished)
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
    return {
        "self_reward_token": settings.self_reward_token,
        "self_reward_token_id": settings.self_reward_token_id,
        "counts": {
            "n_problems": num_problems,
            "n_samples": len(records),
            "n_finished": len(finished),
            "n_correct": sum(bool(r["correct"]) for r in records),
            "n_correct_finished": n_correct,
            "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
            "accuracy_finished": n_correct / len(finished),
            "auroc_null_std": auroc_null_std(labels),
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
    }


def _write(output_dir: str | os.PathLike, records: list[dict], result: dict[str, Any]) -> None:
    """`samples.jsonl` (without the token ids) and `probe.json` into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for record in records:
            record.pop("token_ids")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, "probe.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
