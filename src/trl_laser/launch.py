"""Relaunching `trl-laser train` through `accelerate launch`, and what a machine without a GPU needs for that.

`trl-laser train --accelerate_config NAME|PATH [accelerate flags]` runs the training script again under
`accelerate launch`; `ddp`, `zero2`, `zero3` and `zero3_multinode` name the configs shipped in
`recipes/accelerate_configs/` (and inside the package). The shipped configs are written for GPUs (NCCL, bf16). On a
machine without one the same command still runs, so that a distributed recipe can be dry-run on a laptop before a
cluster is rented: the launch uses gloo (`--ddp_backend gloo`, and `--use_cpu true` outside DeepSpeed) and fp32, and
says so in one line; a setting that cannot work there (bf16 or fp16 under DeepSpeed) is refused before anything
starts. On every machine the launch's mixed precision follows the recipe's `bf16` / `fp16`.

This module also reads the launch arguments themselves (accelerate's options, a flag's value, the process count), for
`trl_laser.recipe`, which splits them off a command line, and for the launch plan.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


ACCELERATE_CONFIG_DIR = Path("recipes") / "accelerate_configs"
ACCELERATE_CONFIG_FLAG = "--accelerate_config"


class LaunchError(ValueError):
    """A launch that cannot work as asked: reported in one line, naming the setting to change."""


class LaunchedRunFailed(RuntimeError):
    """A launched process failed; it has printed its own error, so this one only says which and how."""

    def __init__(self, returncode: int, rank: int | None = None):
        self.returncode = returncode if returncode > 0 else 1  # a negative code is a signal: exit 1
        who = "a launched process" if rank is None or rank < 0 else f"the launched process of rank {rank}"
        super().__init__(f"{who} failed (exit code {returncode}); its error is printed above.")


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


def launch_options() -> dict[str, argparse.Action]:
    """The options of `accelerate launch`, by option string: the keys that `trl-laser train` hands to it."""
    from accelerate.commands.launch import launch_command_parser

    actions = {}
    for action in launch_command_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                actions[option] = action
    return actions


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of `flag VALUE` / `flag=VALUE` in `args`, the last one when repeated (as argparse reads it: the
    recipe's launch arguments come first, the command line's after, and win)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def command_without(args: list[str], flag: str) -> list[str]:
    """`args` without every `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def launch_world_size(launch_args: list[str]) -> int:
    """How many processes `accelerate launch` starts for `launch_args` (all machines together): the last
    `--num_processes`, else the accelerate config's `num_processes`, else 1."""
    import yaml

    value: Any = _flag_value(launch_args, "--num_processes")
    config_name = _flag_value(launch_args, ACCELERATE_CONFIG_FLAG)
    if value is None and config_name is not None:
        with open(resolve_accelerate_config(config_name), encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("num_processes", 1)
    try:
        count = 1 if value is None else int(value)
    except ValueError:
        raise LaunchError(f"`--num_processes` must be an integer, got {value!r}.") from None
    if count < 1:
        raise LaunchError(f"`--num_processes` must be >= 1, got {count}.")
    return count


@contextlib.contextmanager
def assumed_world_size(count: int, config_class: type) -> Iterator[None]:
    """Let `config_class` see `count` processes while the launching process (alone) builds it.

    GRPOConfig sizes and checks the generation batch with the number of processes (`per_device_train_batch_size x
    processes x steps_per_generation`, divisible by `num_generations`): checked with 1, a recipe that is right for the
    launched processes would be refused, and one that is wrong for them accepted.
    """
    original = config_class.__dict__.get("world_size")
    config_class.world_size = property(lambda self: count)
    try:
        yield
    finally:
        if original is None:
            del config_class.world_size
        else:
            config_class.world_size = original


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
        path = resolve_accelerate_config(value)
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        args = ["--config_file", str(path)] + command_without(args, ACCELERATE_CONFIG_FLAG)
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


def relaunch(
    script: str | os.PathLike,
    script_argv: list[str],
    launch_args: list[str],
    training_args: Any,
    prepare: Callable[[], None] | None = None,
) -> None:
    """Run `script` under `accelerate launch`, with the launch arguments first and the recipe arguments after.

    `prepare` runs once the launch is planned and checked, before any process starts.

    Raises `LaunchedRunFailed` when the launched run fails (it has printed why).
    """
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    accelerate_args, extra = launch_plan(launch_args, training_args)
    if prepare is not None:
        prepare()
    command = accelerate_args + [str(Path(script).resolve())] + script_argv + extra
    print(f"[trl-laser] accelerate launch {shlex.join(command)}", flush=True)
    try:
        launch_command(launch_command_parser().parse_args(command))
    except subprocess.CalledProcessError as err:  # one process
        raise LaunchedRunFailed(err.returncode) from None
    except ChildFailedError as err:  # torch.distributed.run's report of the first rank that failed
        rank, failure = err.get_first_failure()
        raise LaunchedRunFailed(failure.exitcode, rank) from None


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
