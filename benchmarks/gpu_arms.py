"""The training arms of the GPU check (`gpu.py`), run in its worker processes: each trains one configuration on
the workload of `gpu_workload.py` and prints its result as one marked JSON line, as soon as it is done.

- `grpo`, `laser`, `laser_mixing`: TRL's `GRPOTrainer`, LaSeR before the mix, LaSeR mixing from step 0 with no old
  log-probs; `learning_rate=0`, a 0/1 reward of both classes. Step times, log-prob forwards, peak memory.
- `fused_head`: LaSeR in the training precision through TRL's fused LM head, c_ref "auto", a learning rate, and a
  constant reward of 1 (GRPO's advantages are all 0: only LaSeR's term moves the weights). `score_check` compares the
  first training forward's r_s with `score_completions` on a float32 copy of the same weights, and measures how far
  the steps moved the mean r_s.
- `liger`: the same with `use_liger_kernel=True`, where Liger can run (CUDA and liger-kernel), else without it.
- `zero3` (its own worker, under `accelerate launch`): LaSeR under DeepSpeed ZeRO-3, save, reload, score.

    python benchmarks/gpu_arms.py train --arms grpo laser [workload options]    # as `gpu.py` runs it
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
import traceback
from typing import Any, NamedTuple

from step_stats import batch_record


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
ARM_MARKER = "GPU_BENCH_ARM "
ARM_FAILED_MARKER = "GPU_BENCH_ARM_FAILED "
ZERO3_MARKER = "GPU_BENCH_ZERO3 "
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


def flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The workload options (`WORKER_OPTIONS`), which the parent takes and hands to its workers as given."""
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
    parser.add_argument("--zero3-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="of the fused_head/liger/zero3 arms")
    parser.add_argument("--bf16", type=flag, default=True)
    parser.add_argument("--gradient-checkpointing", type=flag, default=True)
    parser.add_argument("--seed", type=int, default=0)


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


def main() -> None:
    parser = argparse.ArgumentParser(description="A worker of benchmarks/gpu.py.")
    parser.add_argument("worker", choices=["train", "zero3"])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=[])
    add_options(parser)
    args = parser.parse_args()
    if args.worker == "train":
        train_worker(args)
    else:
        zero3_worker(args)


if __name__ == "__main__":
    main()
