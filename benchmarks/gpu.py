"""The GPU check in one command: what LaSeR costs over TRL's GRPO on a GPU, and whether it is right there in bf16,
with TRL's Triton fused LM head, with Liger's kernels and under DeepSpeed ZeRO-3.

Sections (`--sections`, all by default):

- `overhead`: TRL's `GRPOTrainer` (`grpo`) against `LaSeRGRPOTrainer` before the mix (`laser`) and in the mixing
  phase with no old log-probs (`laser_mixing`: one extra no-grad forward per generation batch), on identical batches,
  `learning_rate=0`. Median step time and peak `torch.cuda.max_memory_allocated` per arm, ratios to `grpo`.
- `bf16`: `fused_head`, LaSeR in bf16 through TRL's fused LM head (Triton on a GPU, folded in torch elsewhere). The
  z_c score r_s of every finished completion of the first training forward against `score_completions` on a float32
  copy of the same weights (full logits at the EOS position): `bf16_score_max_abs_err`. Then, under a constant 0/1
  reward (GRPO's advantages are all 0, so only LaSeR's term moves the weights), the mean r_s after the steps minus
  before: the z_c log-prob must rise toward the target.
- `liger`: `liger`, the same arm with `use_liger_kernel=True` (Liger's layer kernels; TRL keeps its fused head): it
  must train, move z_c as `fused_head` does (the LaSeR term is in the loss), and its step time and memory are
  compared with `fused_head`. On a machine without CUDA, Liger cannot run (Triton): the arm runs without it and the
  section says so.
- `zero3`: LaSeR under DeepSpeed ZeRO-3 in one process (`accelerate launch`, the packaged `zero3` config, bf16 on a
  GPU, fp32 on a CPU): a few steps, `save_model`, reload with plain transformers in float32, score the first batch's
  completions with `score_completions`, and compare with the trained model's own score under ZeRO-3.

The model is a random Qwen2 of `--shape` built on the device, and the rollouts are scripted (`gpu_workload.py`):
prompts of ~`--prompt-length` and completions of up to `--completion-length` tokens, most ending with EOS. So the
timed step is the training step (reward, LaSeR's work, forward, backward, optimizer, logging); generation, the same
work in every arm, is left out, which makes the ratios an upper bound of the overhead with generation included.

The arms (`gpu_arms.py`) train in worker processes, each arm with a fresh model and `reset_peak_memory_stats`
before `train`: the overhead arms and `fused_head` one after another in one process (round 1, `fused_head`, the
other rounds); `liger` in its own where Liger can run (its patches replace transformers' classes for the whole
process); `zero3` under `accelerate launch`. Each process gets a share of `--budget` seconds and prints each arm's
result when it is done; a section that fails or runs out of time is written as such, the others are kept. Results:
`--output` (default `benchmarks/results/gpu.json`), the workers' logs beside it.

    python benchmarks/gpu.py                      # on a GPU; `bash benchmarks/gpu_check.sh` on the lent machine
    python benchmarks/gpu.py --dry-run --output /tmp/gpu.json    # CPU, tiny model: every section, every key
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

from gpu_arms import ARM_FAILED_MARKER, ARM_MARKER, ARMS, WORKER_OPTIONS, ZERO3_MARKER, add_options, liger_missing
from step_stats import identical_batches, ratios, summarize


SECTIONS = ("overhead", "bf16", "liger", "zero3")
TIME_RATIOS = {
    "step_time_ratio": ("laser", "grpo"),
    "step_time_ratio_mixing": ("laser_mixing", "grpo"),
    "liger_step_time_ratio": ("liger", "fused_head"),
}
MEMORY_RATIOS = {
    "peak_memory_ratio": ("laser", "grpo"),
    "peak_memory_ratio_mixing": ("laser_mixing", "grpo"),
    "liger_peak_memory_ratio": ("liger", "fused_head"),
}
GOALS = {"step_time_ratio": 1.02, "peak_memory_ratio": 1.01, "bf16_score_max_abs_err": 0.05}
REQUIRED_KEYS = (
    "device",
    "step_time_ratio",
    "step_time_ratio_mixing",
    "peak_memory_ratio",
    "liger_ok",
    "bf16_score_max_abs_err",
)
RESERVE_S = {"liger": 80, "zero3": 110}  # of the budget, kept for the processes that run later
DRY_RUN = dict(
    shape="tiny",
    prompts=2,
    generations=2,
    prompt_length=12,
    completion_length=16,
    steps=1,
    warmup_steps=1,
    zero3_steps=1,
    rounds=1,
    budget=600,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process(command: list[str], timeout: float, log_path: str) -> tuple[int | None, list[str]]:
    """Run `command` in its own process group, its output (both streams) copied to `log_path` line by line and
    echoed when a line is a result; `(exit status or None on timeout, output lines)`. The group is killed on the way
    out, so no launched grandchild outlives it."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                if line.startswith((ARM_MARKER, ARM_FAILED_MARKER, ZERO3_MARKER)):
                    try:
                        print(f"  [{time.strftime('%H:%M:%S')}] {brief(line)}", flush=True)
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        print(f"  (unreadable result line: {line[:120]!r})", flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            status: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            status = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            reader.join(timeout=10)
    return status, lines


def brief(line: str) -> str:
    """One result line, shortened for the console."""
    marker = next(m for m in (ARM_FAILED_MARKER, ARM_MARKER, ZERO3_MARKER) if line.startswith(m))
    data = json.loads(line[len(marker) :])
    if marker == ARM_FAILED_MARKER:
        return f"{data['arm']} (round {data['round']}) FAILED: {data['error'].strip().splitlines()[-1]}"
    if marker == ZERO3_MARKER:
        return f"zero3: {data['steps']} steps, score error after save/reload {data['score_max_abs_err']}"
    seconds = summarize(data["seconds"])["median"] if data["seconds"] else float("nan")
    check = data.get("check", {})
    extra = f", r_s error {check.get('score_max_abs_err')}, moved {check.get('mean_score_moved')}" if check else ""
    return (
        f"{data['arm']} (round {data['round']}): median {seconds:.3f} s, peak {data['peak_memory_mib']:.0f} MiB{extra}"
    )


def parse(lines: list[str], marker: str) -> list[dict[str, Any]]:
    """The results marked `marker` (a line that another stream's write cut in two is skipped)."""
    found = []
    for line in lines:
        if line.startswith(marker):
            try:
                found.append(json.loads(line[len(marker) :]))
            except json.JSONDecodeError:
                continue
    return found


def worker_command(args: argparse.Namespace, worker: str) -> list[str]:
    command = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_arms.py"), worker]
    for option in WORKER_OPTIONS:
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    return command


def plan_workers(sections: list[str], rounds: int, liger_alone: bool) -> list[list[str]]:
    """The train workers' arms, in order: the first round of the overhead arms, `fused_head`, the other rounds; then
    `liger` (it brings `fused_head`, its comparison). `liger_alone` (Liger will run: its patches are global) puts it
    in a process of its own, after the others; otherwise it runs last in the same one."""
    overhead = ["grpo", "laser", "laser_mixing"] if "overhead" in sections else []
    arms = overhead + (["fused_head"] if "bf16" in sections or "liger" in sections else []) + overhead * (rounds - 1)
    if "liger" not in sections:
        return [arms]
    return [arms, ["liger"]] if liger_alone else [arms + ["liger"]]


def failure(status: int | None, lines: list[str], errors: list[str] = ()) -> dict[str, Any]:
    """A failed section: why (the arms' own errors first, else how the process ended) and the end of its log."""
    how = "timed out" if status is None else f"exited with status {status}"
    return {"status": "failed", "reason": "; ".join([*errors, how]), "log_tail": "".join(lines[-40:])}


def section_status(
    sections: list[str],
    arms: list[str],
    runs: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    status: int | None,
    lines: list[str],
) -> dict[str, dict[str, Any]]:
    """Each section that a train worker served: `ran` when every arm it needs finished at least once (rounds cut
    short are noted), else `failed` with the arms' errors or how the worker ended, and the end of its log."""
    done = [run["arm"] for run in runs]
    result = {}
    for section in ("overhead", "bf16", "liger"):
        wanted = [name for name in dict.fromkeys(arms) if ARMS[name].section == section]
        if section not in sections or not wanted:
            continue
        missing = [name for name in wanted if name not in done]
        errors = [f"{f['arm']} failed: {f['error'].strip().splitlines()[-1]}" for f in failures if f["arm"] in wanted]
        if missing:
            result[section] = failure(status, lines, [f"arms not done: {missing}", *errors])
            continue
        result[section] = {"status": "ran"}
        short = sum(arms.count(name) - done.count(name) for name in wanted)
        if short:
            result[section]["note"] = f"{short} later run(s) not done: " + failure(status, lines, errors)["reason"]
    return result


def aggregate(arms: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: its rounds' measured step times pooled and summarized, peak memory (max over rounds), the rest of
    its first round."""
    result: dict[str, dict[str, Any]] = {}
    for run in arms:
        entry = result.setdefault(run["arm"], {"seconds": [], "peak_memory_mib_rounds": [], "rounds": []})
        entry["seconds"] += run["seconds"]
        entry["peak_memory_mib_rounds"].append(run["peak_memory_mib"])
        entry["rounds"].append(run)
    for entry in result.values():
        first = entry["rounds"][0]
        entry.update(summarize(entry["seconds"]) if entry["seconds"] else {"median": float("nan")})
        entry["peak_memory_mib"] = max(entry["peak_memory_mib_rounds"])
        for key in ("section", "logp_forwards_per_generation_batch", "phases", "parameters", "memory_at_start_mib"):
            entry[key] = first[key]
        for key in ("check", "liger_kernel", "liger_skipped", "liger_applied"):
            if key in first:
                entry[key] = first[key]
        entry["losses_finite"] = all(math.isfinite(x) for run in entry["rounds"] for x in run["losses"])
        entry["step_seconds_rounds"] = [run["step_seconds"] for run in entry.pop("rounds")]
    return result


def liger_verdict(summary: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
    """`liger_ok`: Liger's kernels ran, the losses are finite and z_c's log-prob rose under the constant reward (the
    LaSeR term is in the loss); None when Liger could not run here."""
    liger = summary.get("liger")
    if liger is None:
        return None, "not run"
    if not liger.get("liger_kernel"):
        return None, liger.get("liger_skipped") or "not run"
    moved = liger.get("check", {}).get("mean_score_moved")
    ok = bool(liger.get("liger_applied")) and liger["losses_finite"] and moved is not None and moved > 0
    return (
        ok,
        f"kernels applied: {liger.get('liger_applied')}, losses finite: {liger['losses_finite']}, r_s moved {moved}",
    )


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "liger-kernel", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized run of every section (tiny model)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the overhead arms, alternating")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all sections together")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "gpu.json"))
    add_options(parser)
    args = parser.parse_args()
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)

    started, wall = datetime.now(timezone.utc), time.monotonic()
    deadline = wall + args.budget
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    log_stem = os.path.splitext(output)[0]
    import torch

    cuda = torch.cuda.is_available()
    workers = plan_workers(args.sections, args.rounds, liger_alone=liger_missing() is None)
    zero3_wanted = "zero3" in args.sections and not args.model
    arm_runs: list[dict[str, Any]] = []
    sections: dict[str, dict[str, Any]] = {}
    for index, arms in enumerate(workers):
        later = [RESERVE_S["liger"] for w in workers[index + 1 :] if "liger" in w]
        reserve = sum(later) + (RESERVE_S["zero3"] if zero3_wanted else 0)
        command = [sys.executable, *worker_command(args, "train"), "--arms", *arms]
        print(f"train worker: {' '.join(arms)}", flush=True)
        log = f"{log_stem}_{'liger' if arms == ['liger'] else 'train'}.log"
        status, lines = run_process(command, deadline - time.monotonic() - reserve, log)
        runs = parse(lines, ARM_MARKER)
        arm_runs += runs
        sections.update(section_status(args.sections, arms, runs, parse(lines, ARM_FAILED_MARKER), status, lines))
    zero3: dict[str, Any] | None = None
    if "zero3" in args.sections and args.model:
        sections["zero3"] = {"status": "skipped", "reason": "the ZeRO-3 section trains the random model only"}
    elif zero3_wanted and importlib.util.find_spec("deepspeed") is None:
        sections["zero3"] = {"status": "skipped", "reason": "deepspeed is not installed (`trl-laser[deepspeed]`)"}
    elif zero3_wanted:
        from trl_laser.launch import launch_plan

        launch_args, _ = launch_plan(
            ["--accelerate_config", "zero3", "--num_processes", "1", "--main_process_port", str(free_port())],
            SimpleNamespace(bf16=cuda, fp16=False, ddp_backend=None, use_cpu=False),
            gpu=cuda,
        )
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *worker_command(args, "zero3")]
        print("zero3 worker", flush=True)
        status, lines = run_process(command, deadline - time.monotonic(), f"{log_stem}_zero3.log")
        found = parse(lines, ZERO3_MARKER)
        zero3 = found[-1] if found else None
        sections["zero3"] = {"status": "ran"} if found else failure(status, lines)

    summary = aggregate(arm_runs)
    liger_ok, liger_reason = liger_verdict(summary)
    if "liger" in sections and sections["liger"]["status"] == "ran" and liger_ok is None:
        sections["liger"] = {"status": "skipped", "reason": liger_reason}
    time_ratios = ratios(summary, TIME_RATIOS, "median")
    memory_ratios = ratios(summary, MEMORY_RATIOS, "peak_memory_mib")
    fused_check = summary.get("fused_head", {}).get("check", {})
    liger_check = summary.get("liger", {}).get("check", {})
    runs_by_arm = {name: [run for run in arm_runs if run["arm"] == name] for name in summary}
    batch_checks = identical_batches(runs_by_arm, TIME_RATIOS.values())
    values = {
        **time_ratios,
        **memory_ratios,
        "bf16_score_max_abs_err": fused_check.get("score_max_abs_err"),
    }
    # On a CPU the peak is the worker's RSS so far, not the arm's own: no memory goal is judged there.
    judged = [name for name in GOALS if values.get(name) is not None and (cuda or "memory" not in name)]
    goals = {name: {"max": GOALS[name], "met": values[name] <= GOALS[name]} for name in judged}
    zero3_ok = None
    if zero3 is not None:
        err = zero3["score_max_abs_err"]
        zero3_ok = bool(
            zero3["self_reward_config_saved"]
            and zero3["weights_finite"]
            and zero3["parameters_saved"] == zero3["parameters_trained"]
            and err is not None
            and err <= GOALS["bf16_score_max_abs_err"]
        )
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - wall, 1),
        "device": device_name(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), **versions()},
        "settings": {
            "dry_run": args.dry_run,
            "model": args.model or f"random {args.shape} (Qwen2 config, seed {args.seed})",
            "sections": args.sections,
            "workers": workers,
            "prompts_per_generation_batch": args.prompts,
            "generations_per_prompt": args.generations,
            "prompt_length": args.prompt_length,
            "completion_length": args.completion_length,
            "measured_steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "rounds": args.rounds,
            "zero3_steps": args.zero3_steps,
            "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "learning_rate_check_arms": args.learning_rate,
            "self_reward_beta": args.self_reward_beta,
            "timed_unit": "one optimizer step (one generation batch), generation scripted, from on_step_begin to the "
            "end of its logging"
            if not args.model
            else "one optimizer step, generation included",
            "peak_memory": "torch.cuda.max_memory_allocated after reset_peak_memory_stats before train()"
            if cuda
            else "ru_maxrss of the worker process so far (cumulative over its arms: no per-arm figure on a CPU)",
        },
        **values,
        "liger_ok": liger_ok,
        "liger_reason": liger_reason,
        "bf16_score_max_abs_err_liger": liger_check.get("score_max_abs_err"),
        "zero3_ok": zero3_ok,
        "zero3": zero3,
        "goals": goals,
        "identical_batches": all(batch_checks.values()) if batch_checks else None,
        "identical_batches_pairs": batch_checks,
        "sections": sections,
        "arms": summary,
    }
    for key in REQUIRED_KEYS:
        result.setdefault(key, None)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print_summary(result, output)


def print_summary(result: dict[str, Any], output: str) -> None:
    print(f"\ndevice: {result['device']}")
    print(f"\n{'arm':<14} {'n':>3} {'median s':>9} {'IQR s':>7} {'peak MiB':>10}  check")
    for name, s in result["arms"].items():
        check = s.get("check", {})
        note = (
            f"r_s err {check['score_max_abs_err']:.4f} (plain {check['plain_forward_dtype']} forward: "
            f"{check['plain_forward_score_max_abs_err']:.4f}), r_s moved {check['mean_score_moved']:+.4f}"
            if "score_max_abs_err" in check
            else ""
        )
        print(
            f"{name:<14} {s.get('n', 0):>3} {s['median']:>9.3f} {s.get('iqr', 0):>7.3f} {s['peak_memory_mib']:>10.0f}  {note}"
        )
    print()
    for name in (*TIME_RATIOS, *MEMORY_RATIOS, "bf16_score_max_abs_err", "bf16_score_max_abs_err_liger"):
        value = result.get(name)
        goal = result["goals"].get(name)
        verdict = f" (goal <= {goal['max']}: {'met' if goal['met'] else 'NOT met'})" if goal else ""
        print(f"{name:<32} {'n/a' if value is None else f'{value:.4f}'}{verdict}")
    print(f"{'liger_ok':<32} {result['liger_ok']} ({result['liger_reason']})")
    print(f"{'zero3_ok':<32} {result['zero3_ok']}")
    print(f"{'identical_batches':<32} {result['identical_batches']}")
    for name, section in result["sections"].items():
        print(f"section {name}: {section['status']}" + (f" ({section['reason']})" if "reason" in section else ""))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
