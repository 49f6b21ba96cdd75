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

The overhead, bf16 and liger arms train one after another in one process (Liger's patches are global, so `liger`
runs last), each with a fresh model and `reset_peak_memory_stats` before `train`; `zero3` runs in its own. Each
process gets a share of `--budget` seconds; a section that fails or runs out of time is reported as such, and the
others are still written. Results: `--output` (default `benchmarks/results/gpu.json`), the workers' logs beside it.

    python benchmarks/gpu.py                      # on a GPU; `bash benchmarks/gpu_check.sh` on the lent machine
    python benchmarks/gpu.py --dry-run --output /tmp/gpu.json    # CPU, tiny model: every section, every key
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, NamedTuple

from step_stats import batch_record, identical_batches, ratios, summarize


class Arm(NamedTuple):
    """One training configuration of the train worker."""

    section: str
    laser: bool
    mixing: bool  # advantage mix on from the first step
    reward: str  # "hash" (both classes) or "constant" (all correct)
    learns: bool  # learning_rate > 0 and c_ref "auto"
    liger: bool


ARMS = {
    "grpo": Arm("overhead", laser=False, mixing=False, reward="hash", learns=False, liger=False),
    "laser": Arm("overhead", laser=True, mixing=False, reward="hash", learns=False, liger=False),
    "laser_mixing": Arm("overhead", laser=True, mixing=True, reward="hash", learns=False, liger=False),
    "fused_head": Arm("bf16", laser=True, mixing=False, reward="constant", learns=True, liger=False),
    "liger": Arm("liger", laser=True, mixing=False, reward="constant", learns=True, liger=True),
}
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
ARM_MARKER = "GPU_BENCH_ARM "
ARM_FAILED_MARKER = "GPU_BENCH_ARM_FAILED "
ZERO3_MARKER = "GPU_BENCH_ZERO3 "
RESERVE_S = {"liger": 80, "zero3": 110}  # of the budget, kept for the processes that run later
MIB = 1024 * 1024
# Options handed from the parent to its workers, as given.
WORKER_OPTIONS = (
    "shape",
    "model",
    "self_reward_token",
    "self_reward_ref_constant",
    "self_reward_beta",
    "prompts",
    "generations",
    "prompt_length",
    "completion_length",
    "steps",
    "warmup_steps",
    "zero3_steps",
    "learning_rate",
    "bf16",
    "gradient_checkpointing",
    "seed",
)
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


# ---------------------------------------------------------------------------------------------- the train worker
def workload(args: argparse.Namespace, dtype: Any) -> tuple[Any, Any, Any, Any]:
    """`(tokenizer, model, dataset, rollout_func)`: the random model and scripted rollouts, or a named model with its
    own generation on arithmetic prompts (`--model`, e.g. SmolLM2 for the CPU bf16 measurement)."""
    import torch
    from gpu_workload import SHAPES, ScriptedRollout, prompt_dataset, random_model, word_tokenizer

    from trl_laser.data import ARITHMETIC_INSTRUCTION, make_arithmetic_dataset, to_prompt_dataset
    from trl_laser.models import load_model_and_tokenizer

    if args.model:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        dataset = to_prompt_dataset(make_arithmetic_dataset("train", seed=0), instruction=ARITHMETIC_INSTRUCTION)
        return tokenizer, model, dataset, None
    vocab = SHAPES[args.shape]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    model = random_model(args.shape, tokenizer, dtype, args.seed, "cuda" if torch.cuda.is_available() else "cpu")
    rollout = ScriptedRollout(vocab, tokenizer.eos_token_id, args.prompt_length, args.completion_length, args.seed)
    return tokenizer, model, prompt_dataset(64), rollout


def training_config(args: argparse.Namespace, arm: Arm, output_dir: str, cuda: bool, **overrides: Any) -> Any:
    """The arm's `GRPOConfig` or `LaSeRConfig`: TRL's defaults except what makes arms comparable and runs short."""
    from trl import GRPOConfig

    from trl_laser import LaSeRConfig

    max_steps = args.warmup_steps + args.steps
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        max_steps=max_steps,
        learning_rate=args.learning_rate if arm.learns else 0.0,
        weight_decay=0.0,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not cuda,
        use_liger_kernel=arm.liger,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
    )
    common.update(overrides)
    if not arm.laser:
        return GRPOConfig(**common)
    return LaSeRConfig(
        **common,
        self_reward_token=args.self_reward_token,
        self_reward_beta=args.self_reward_beta,
        self_reward_ref_constant="auto" if arm.learns else args.self_reward_ref_constant,
        reasoning_warmup_steps=0,
        # Mix on from step 0, or never reached (global steps run from 0 to max_steps - 1).
        self_reward_warmup_steps=0 if arm.mixing else common["max_steps"],
    )


def finished_rows(first: dict[str, Any], token_id: int) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """From one recorded log-prob forward: each finished row's prompt ids, completion ids (up to its EOS), and the
    log-prob of z_c (the id after that EOS) as the forward scored it."""
    ids, mask, k, logps = first["input_ids"], first["attention_mask"], first["logits_to_keep"], first["logps"]
    prompts, completions, values = [], [], []
    for row in range(ids.size(0)):
        completion, completion_mask = ids[row, -k:], mask[row, -k:]
        columns = ((completion == token_id) & (completion_mask == 1)).nonzero()
        if columns.numel() == 0:
            continue
        column = int(columns[0, 0])
        prompts.append(ids[row, :-k][mask[row, :-k] == 1].tolist())
        completions.append(completion[:column].tolist())
        values.append(float(logps[row, column]))
    return prompts, completions, values


def score_check(trainer: Any, tokenizer: Any, reference: Any, first: dict[str, Any], device: Any) -> dict[str, Any]:
    """The first training forward's r_s against float32 full logits on the same weights, then the mean r_s of the
    same completions with the trained weights: the error of the training forward, and how far training moved it."""
    from trl_laser import score_completions

    settings = trainer.self_reward_settings()
    prompts, completions, logps = finished_rows(first, trainer.self_reward_token_id)
    if not logps:
        return {"finished": 0}
    beta, c_ref = settings.self_reward_beta, settings.self_reward_ref_constant
    trained = [beta * (logp - c_ref) for logp in logps]
    reference.to(device)

    def score() -> list[float]:
        return score_completions(reference, tokenizer, prompts, completions, settings=settings, batch_size=4)

    before = score()
    # The same initial weights in their training dtype, through a plain forward (full logits): what half precision
    # alone costs, to set beside the training forward's error.
    dtype = trainer.accelerator.unwrap_model(trainer.model).dtype
    reference.to(dtype)
    plain = score()
    reference.float()  # exact: the initial weights are values of `dtype`
    reference.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    after = score()
    errors = [abs(a - b) for a, b in zip(trained, before)]
    plain_errors = [abs(a - b) for a, b in zip(plain, before)]
    moved = sum(after) / len(after) - sum(before) / len(before)
    return {
        "finished": len(logps),
        "c_ref": c_ref,
        "beta": beta,
        "score_max_abs_err": max(errors),
        "score_mean_abs_err": sum(errors) / len(errors),
        "logp_max_abs_err": max(errors) / beta,
        "plain_forward_dtype": str(dtype).replace("torch.", ""),
        "plain_forward_score_max_abs_err": max(plain_errors),
        "plain_forward_score_mean_abs_err": sum(plain_errors) / len(plain_errors),
        "mean_score_before": sum(before) / len(before),
        "mean_score_after": sum(after) / len(after),
        "mean_score_moved": moved,
        "mean_logp_moved": moved / beta,
    }


def liger_applied(model: Any) -> bool:
    """Whether any module of `model` runs a Liger kernel (a Liger class, or a forward patched in from Liger)."""
    for module in model.modules():
        forward = getattr(module, "forward", None)
        origin = getattr(getattr(forward, "__func__", forward), "__module__", "") or ""
        if type(module).__module__.startswith("liger_kernel") or origin.startswith("liger_kernel"):
            return True
    return False


def liger_missing() -> str | None:
    """Why Liger cannot run here, or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels, which need a GPU: the arm ran without Liger"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (`pip install 'trl-laser[liger]'`): the arm ran without Liger"
    return None


def run_arm(name: str, args: argparse.Namespace, round_index: int) -> dict[str, Any]:
    """Train one arm in this process; its step times, batches, forwards, peak memory and (check arms) score check."""
    import copy
    import resource

    import torch
    from gpu_workload import verifier
    from trainer_probes import ForwardTap, StepTimer
    from trl import GRPOTrainer

    from trl_laser import LaSeRGRPOTrainer

    cuda = torch.cuda.is_available()
    skipped = liger_missing() if ARMS[name].liger else None
    arm = ARMS[name]._replace(liger=ARMS[name].liger and skipped is None)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tokenizer, model, dataset, rollout = workload(args, dtype)
    batches: list[list] = []
    reward = verifier(arm.reward, lambda ids: batches.append(batch_record(ids)))
    # The float32 reference copy waits on the CPU, so that it is not part of the arm's peak memory.
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval() if arm.learns else None
    with tempfile.TemporaryDirectory() as output_dir:
        config = training_config(args, arm, output_dir, cuda)
        trainer_class = LaSeRGRPOTrainer if arm.laser else GRPOTrainer
        extra = {"rollout_func": rollout} if rollout is not None else {}
        timer = StepTimer(torch.cuda.synchronize if cuda else None)
        trainer = trainer_class(
            model=model,
            reward_funcs=[reward],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
            **extra,
        )
        forwards = ForwardTap(trainer, keep_first=arm.learns)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start_mib = torch.cuda.memory_allocated() / MIB if cuda else None
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        peak_mib = (
            torch.cuda.max_memory_allocated() / MIB
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        history = trainer.state.log_history
        result = {
            "arm": name,
            "round": round_index,
            "section": arm.section,
            "seconds": timer.seconds[args.warmup_steps :],
            "step_seconds": timer.seconds,
            "batches": batches,
            "logp_forwards_per_generation_batch": forwards.count / max(len(batches), 1),
            "phases": sorted({log["self_reward/phase"] for log in history if "self_reward/phase" in log}),
            "losses": [log["loss"] for log in history if "loss" in log],
            "peak_memory_mib": peak_mib,
            "memory_at_start_mib": start_mib,
            "completion_tokens": [tokens for tokens, _ in batches],
            "parameters": trainer.accelerator.unwrap_model(trainer.model).num_parameters(),
        }
        if ARMS[name].liger:
            result["liger_kernel"] = arm.liger
            result["liger_skipped"] = skipped
            result["liger_applied"] = liger_applied(trainer.model)
        if arm.learns:
            result["check"] = score_check(trainer, tokenizer, reference, forwards.first, trainer.accelerator.device)
    del trainer, model, reference, forwards
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def train_worker(args: argparse.Namespace) -> None:
    """Run `args.arms` in order, printing each arm's result as one marked line as soon as it is done."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rounds: dict[str, int] = {}
    for name in args.arms:
        rounds[name] = rounds.get(name, -1) + 1
        try:
            result = run_arm(name, args, rounds[name])
        except Exception:  # the other arms still run: a failure is a result too
            failure = {"arm": name, "round": rounds[name], "error": traceback.format_exc()[-4000:]}
            print(ARM_FAILED_MARKER + json.dumps(failure), flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        print(ARM_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- the ZeRO-3 worker
def zero3_worker(args: argparse.Namespace) -> None:
    """A few LaSeR steps under ZeRO-3, save, reload in plain transformers, score; one marked result line."""
    import torch
    from gpu_workload import SHAPES, ScriptedRollout, prompt_dataset, random_model, verifier, word_tokenizer
    from trainer_probes import ForwardTap, StepTimer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from trl_laser import SELF_REWARD_CONFIG_NAME, LaSeRGRPOTrainer, SelfRewardSettings, score_completions

    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reload must score in float32
    if not cuda:  # one process needs no shared-memory all-reduce: skip its JIT build (g++, ~75 s on 2 cores)
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    vocab = SHAPES[args.shape]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    rollout = ScriptedRollout(vocab, tokenizer.eos_token_id, args.prompt_length, args.completion_length, args.seed)
    arm = Arm("zero3", laser=True, mixing=False, reward="hash", learns=True, liger=False)
    with tempfile.TemporaryDirectory() as output_dir:
        config = training_config(
            args,
            arm,
            output_dir,
            cuda,
            max_steps=args.zero3_steps,
            bf16=cuda,  # DeepSpeed on a CPU is fp32 only
            use_cpu=False,  # DeepSpeed picks its accelerator itself
            ddp_backend=None if cuda else "gloo",
        )
        # Built after the config: under ZeRO-3 the weights are partitioned as they are created.
        model = random_model(args.shape, tokenizer, torch.bfloat16 if cuda else torch.float32, args.seed)
        timer = StepTimer(torch.cuda.synchronize if cuda else None)
        trainer = LaSeRGRPOTrainer(
            model=model,
            reward_funcs=[verifier(arm.reward, lambda ids: None)],
            args=config,
            train_dataset=prompt_dataset(64),
            processing_class=tokenizer,
            rollout_func=rollout,
            callbacks=[timer],
        )
        forwards = ForwardTap(trainer, keep_first=True)
        trainer.train()
        expected = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
        first = forwards.first
        prompts, completions, _ = finished_rows(first, trainer.self_reward_token_id)
        device = trainer.accelerator.device
        with torch.no_grad():  # the trained model's own score, through the training forward under ZeRO-3
            logps, _, _ = forwards(
                trainer.model,
                first["input_ids"].to(device),
                first["attention_mask"].to(device),
                first["logits_to_keep"],
            )
        _, _, trained_logps = finished_rows({**first, "logps": logps.float().cpu()}, trainer.self_reward_token_id)
        save_dir = os.path.join(output_dir, "saved")
        trainer.save_model(save_dir)
        saved_files = sorted(os.listdir(save_dir))
        settings = SelfRewardSettings.from_pretrained(save_dir)
        del trainer, model
        unset_hf_deepspeed_config()  # the reload is a plain, whole model
        reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).to(device)
        scores = score_completions(
            reloaded, AutoTokenizer.from_pretrained(save_dir), prompts, completions, settings=save_dir, batch_size=4
        )
        beta, c_ref = settings.self_reward_beta, settings.self_reward_ref_constant
        errors = [abs(beta * (logp - c_ref) - s) for logp, s in zip(trained_logps, scores)]
        finite = all(math.isfinite(p.float().sum().item()) for p in reloaded.parameters())
        result = {
            "steps": len(timer.seconds),
            "step_seconds": timer.seconds,
            "precision": "bf16" if cuda else "fp32 (DeepSpeed on a CPU is fp32 only)",
            "saved_files": saved_files,
            "self_reward_config_saved": SELF_REWARD_CONFIG_NAME in saved_files,
            "parameters_saved": reloaded.num_parameters(),
            "parameters_trained": expected,
            "weights_finite": finite,
            "finished": len(errors),
            "score_max_abs_err": max(errors) if errors else None,
        }
    print(ZERO3_MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------ the parent
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
    command = [os.path.abspath(__file__), "--worker", worker]
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
    parser.add_argument("--worker", choices=["train", "zero3"], help=argparse.SUPPRESS)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized run of every section (tiny model)")
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="random Qwen2 shape (gpu_workload.SHAPES)")
    parser.add_argument("--model", help="a named model instead (own generation on arithmetic prompts); bf16/overhead")
    parser.add_argument("--self-reward-token", default="<z_c>")
    parser.add_argument("--self-reward-ref-constant", type=float, default=-12.0, help="c_ref of the overhead arms")
    parser.add_argument("--self-reward-beta", type=float, default=0.1)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--completion-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per arm")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps run first, not measured")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the overhead arms, alternating")
    parser.add_argument("--zero3-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="of the bf16/liger arms")
    parser.add_argument("--bf16", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--gradient-checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=480, help="seconds for all sections together")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "gpu.json"))
    args = parser.parse_args()
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)

    if args.worker == "train":
        train_worker(args)
        return
    if args.worker == "zero3":
        zero3_worker(args)
        return

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
