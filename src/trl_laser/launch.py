"""Relaunching `trl-laser train` through `accelerate launch`, and what a machine without a GPU needs for that.

`trl-laser train --accelerate_config NAME|PATH [accelerate flags]` runs the training script again under
`accelerate launch`; `ddp`, `zero2`, `zero3` and `zero3_multinode` name the configs shipped in
`recipes/accelerate_configs/` (and inside the package). The shipped configs are written for GPUs (NCCL, bf16). On a
machine without one the same command still runs, so that a distributed recipe can be dry-run on a laptop before a
cluster is rented: the launch uses gloo (`--ddp_backend gloo`, and `--use_cpu true` outside DeepSpeed) and fp32, and
says so in one line; a setting that cannot work there (bf16 or fp16 under DeepSpeed) is refused before anything
starts. On every machine the launch's mixed precision follows the recipe's `bf16` / `fp16`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import shlex
from pathlib import Path
from typing import Any


ACCELERATE_CONFIG_DIR = Path("recipes") / "accelerate_configs"
ACCELERATE_CONFIG_FLAG = "--accelerate_config"


class LaunchError(ValueError):
    """A launch that cannot work as asked: reported in one line, naming the setting to change."""


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def packaged_accelerate_configs() -> dict[str, Path]:
    """The accelerate configs shipped inside the package, by name."""
    folder = importlib.resources.files("trl_laser") / "accelerate_configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A config file: the path itself, else `recipes/accelerate_configs/<name>.yaml` here, else the packaged copy."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    local = ACCELERATE_CONFIG_DIR / f"{name_or_path}.yaml"
    if local.is_file():
        return local
    packaged = packaged_accelerate_configs()
    if name_or_path in packaged:
        return packaged[name_or_path]
    raise LaunchError(
        f"Accelerate config '{name_or_path}' is neither a file nor one of the shipped configs "
        f"{sorted(packaged)}: give a path or one of those names."
    )


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def launch_plan(launch_args: list[str], training_args: Any, gpu: bool | None = None) -> tuple[list[str], list[str]]:
    """The arguments of `accelerate launch` for `launch_args` (the recipe's and the command line's), and the training
    settings to add for the launched processes.

    `--accelerate_config X` becomes `--config_file <file>`, checked for what its distributed type needs, and
    `--mixed_precision` follows the recipe's `bf16` / `fp16`. Without a GPU (`gpu=False`; detected when None) the
    launch uses one gloo process group, says so in one line, and refuses what cannot work there (bf16/fp16 under
    DeepSpeed, a GPU-only backend). The processes
    get `--ddp_backend gloo` (with accelerate's default each would believe it is alone) and, outside DeepSpeed,
    `--use_cpu true` (accelerate's multi-CPU mode; DeepSpeed picks its CPU accelerator itself).
    """
    import yaml

    args = list(launch_args)
    config: dict[str, Any] = {}
    value = _flag_value(args, ACCELERATE_CONFIG_FLAG)
    if value is not None:
        index = next(
            i for i, a in enumerate(args) if a == ACCELERATE_CONFIG_FLAG or a.startswith(f"{ACCELERATE_CONFIG_FLAG}=")
        )
        path = resolve_accelerate_config(value)
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        width = 2 if args[index] == ACCELERATE_CONFIG_FLAG else 1
        args = ["--config_file", str(path)] + args[:index] + args[index + width :]
    deepspeed = config.get("distributed_type") == "DEEPSPEED" or "--use_deepspeed" in args
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(
            f"Accelerate config '{value}' uses DeepSpeed, which is not installed: `pip install "
            '"trl-laser[deepspeed]"`, or use `--accelerate_config ddp`.'
        )
    # The recipe's precision decides (as it decides gradient accumulation): a config's `mixed_precision: bf16` beside a
    # recipe's `bf16: false` would otherwise fail inside DeepSpeed ("ds bf16.enabled=True vs hf bf16 False").
    wanted = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    asked = _flag_value(args, "--mixed_precision")
    if asked is not None and asked != wanted:
        raise LaunchError(
            f"`--mixed_precision {asked}` contradicts the recipe's precision (bf16={bool(training_args.bf16)}, "
            f"fp16={bool(training_args.fp16)}): drop it and set `bf16` / `fp16` in the recipe; the launch follows them."
        )
    if asked is None:
        args += ["--mixed_precision", wanted]
    if gpu is None:
        gpu = gpu_available()
    if gpu:
        return args, []
    if deepspeed and wanted != "no":
        raise LaunchError(
            f"`{wanted}: true` cannot train under DeepSpeed on a machine without a GPU (its CPU path is fp32 only): set "
            f"`{wanted}: false` in the recipe or pass `--{wanted} false`."
        )
    if training_args.ddp_backend not in (None, "gloo"):
        raise LaunchError(
            f"`ddp_backend: {training_args.ddp_backend}` needs a GPU, and this machine has none: drop it or set "
            "`ddp_backend: gloo`."
        )
    extra = [] if training_args.ddp_backend == "gloo" else ["--ddp_backend", "gloo"]
    if not deepspeed and not training_args.use_cpu:
        extra += ["--use_cpu", "true"]
    print("[trl-laser] No GPU here: the launch runs on CPU, with gloo and fp32 (mixed_precision no).", flush=True)
    return args, extra


def relaunch(script: str | os.PathLike, script_argv: list[str], launch_args: list[str], training_args: Any) -> None:
    """Run `script` under `accelerate launch`, with the launch arguments first and the recipe arguments after.

    Raises `subprocess.CalledProcessError` when the launched run fails (it has printed why).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    accelerate_args, extra = launch_plan(launch_args, training_args)
    command = accelerate_args + [str(Path(script).resolve())] + script_argv + extra
    print(f"[trl-laser] accelerate launch {shlex.join(command)}", flush=True)
    launch_command(launch_command_parser().parse_args(command))


def skip_deepspeed_shm_build() -> None:
    """In a launched process on a machine without a GPU, keep DeepSpeed from compiling its shared-memory all-reduce.

    DeepSpeed JIT-compiles it with g++ when it starts on CPU (about 75 s here, and a compiler that a laptop may lack);
    gloo alone gives identical results.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return
    if importlib.util.find_spec("deepspeed") is None or gpu_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
