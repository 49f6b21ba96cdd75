"""Relaunching `trl-laser train` through `accelerate launch`, and what a machine without a GPU needs for that.

`trl-laser train --accelerate_config NAME|PATH [accelerate flags]` runs the training script again under
`accelerate launch`; `ddp`, `zero2`, `zero3` and `zero3_multinode` name the configs shipped in
`recipes/accelerate_configs/` (and inside the package). The shipped configs are written for GPUs (NCCL, bf16). On a
machine without one the same command still runs, so that a distributed recipe can be dry-run on a laptop before a
cluster is rented: the launch uses gloo (`--ddp_backend gloo`, and `--use_cpu true` outside DeepSpeed) and fp32, and
says so in one line; a setting that cannot work there (bf16 or fp16 under DeepSpeed) is refused before anything
starts. On every machine the launch's mixed precision follows the recipe's `bf16` / `fp16`.

Before anything starts, the launch plan also refuses what would only fail once every process has loaded the model
(ZeRO-3 generation without `ds3_gather_for_generation`, the least-squares row update under DeepSpeed or FSDP) or would
wait for a machine that never comes (a multi-node launch without a usable `--main_process_ip`, a `--machine_rank`
without several machines).

The launched processes die with the launcher, and an interrupt ends the launcher even while it waits inside
torch.distributed's C++ rendezvous (`trl_laser.launch_lifetime`).

This module also reads the launch arguments themselves (accelerate's options, a flag's value, the process count), for
`trl_laser.recipe`, which splits them off a command line, and for the launch plan.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import json
import os
import shlex
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .launch_lifetime import INTERRUPT_GRACE_S, interrupts_end_the_launch, launcher_environment, stop_children


ACCELERATE_CONFIG_DIR = Path("recipes") / "accelerate_configs"
ACCELERATE_CONFIG_FLAG = "--accelerate_config"
# How long machine_rank > 0 tries to reach machine 0 before the launch.
CONNECT_TIMEOUT_S = 3.0


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


def _read_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """An accelerate config file (YAML or JSON) as a mapping; `{}` for none."""
    import yaml

    if path is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _default_config() -> str | None:
    """accelerate's own default config (`accelerate config`), which `accelerate launch` reads without a config."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    return default_config_file


def _shipped_value(name: str, key: str) -> Any:
    """`key` of the shipped config that `name` names (not a file of the user's), else None."""
    packaged = packaged_accelerate_configs()
    if os.path.isfile(name) or name not in packaged:
        return None
    return _read_config(packaged[name]).get(key)


def _int_setting(args: list[str], config: dict[str, Any], key: str, default: int) -> int:
    """`--key` on the command line, else the config's `key`, else `default`, as an integer."""
    value = _flag_value(args, f"--{key}")
    value = value if value is not None else config.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"`--{key}` must be an integer, got {value!r}.") from None


def check_machines(args: list[str], config: dict[str, Any], placeholder: str | None = None) -> None:
    """Refuse a launch that would wait for a machine that never comes, or run as the main machine by mistake.

    `--machine_rank` needs several machines (accelerate ignores it otherwise, and the run saves as the main machine);
    several machines need the address of machine 0 (`placeholder`: the shipped config's, which each launch
    overrides), which must be an address of this machine on machine 0, and reachable from the others.
    """
    machines = _int_setting(args, config, "num_machines", 1)
    rank = _int_setting(args, config, "machine_rank", 0)
    if machines <= 1:
        if rank != 0:
            raise LaunchError(
                f"`--machine_rank {rank}` is the rank of this machine in a run over several machines, and this launch "
                f"has one (`num_machines: {machines}`), so it would run alone as the main machine: launch with a "
                "multi-node config (`--accelerate_config zero3_multinode`, or `--num_machines N` with "
                "`--main_process_ip`), or drop `--machine_rank`."
            )
        return
    if not 0 <= rank < machines:
        raise LaunchError(f"`--machine_rank` must be in 0..{machines - 1} (`num_machines: {machines}`), got {rank}.")
    given = _flag_value(args, "--main_process_ip")
    address = given if given is not None else config.get("main_process_ip")
    if address is None or (given is None and placeholder is not None and str(address) == str(placeholder)):
        where = "" if address is None else f" (the config's `main_process_ip: {address}` is a placeholder)"
        raise LaunchError(
            f"A launch over {machines} machines needs the address of machine 0{where}: pass `--main_process_ip "
            "<IP of machine 0>` (the address every machine reaches it at) and `--main_process_port`, the same on "
            "every machine."
        )
    check_main_process_address(str(address), _int_setting(args, config, "main_process_port", 29500), rank)


def _is_local_address(family: int, address: tuple) -> bool:
    """Whether this machine has `address`: binding to it succeeds (nothing is sent)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address[0], 0, *address[2:]))
        except OSError:
            return False
    return True


def check_main_process_address(address: str, port: int, machine_rank: int) -> None:
    """`--main_process_ip` must resolve; on machine 0 it must be this machine's (machine 0 listens there), and from the
    other machines machine 0 must be reachable: a connection refused means that it is up but not listening yet, which
    is fine (the machines start in any order); no route or no answer within `CONNECT_TIMEOUT_S` is refused."""
    try:
        found = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise LaunchError(f"`--main_process_ip {address}` does not resolve to an address ({err}).") from None
    if any(_is_local_address(family, sockaddr) for family, _, _, _, sockaddr in found):
        return
    if machine_rank == 0:
        raise LaunchError(
            f"`--main_process_ip {address}` is not an address of this machine, and `--machine_rank 0` is machine 0, "
            "which the others connect to: give this machine's address (the one the other machines reach it at), or "
            "run this command with the rank of this machine."
        )
    try:
        socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return
    except OSError as err:
        reason = err.strerror or "no answer"
        raise LaunchError(
            f"`--main_process_ip {address}` (port {port}): machine 0 is not reachable from this machine ({reason} "
            f"within {CONNECT_TIMEOUT_S:g} s). Give the address of machine 0 that this machine reaches it at."
        ) from None


def _zero_stage(args: list[str], config: dict[str, Any]) -> int | None:
    """The ZeRO stage that a DeepSpeed launch runs: `--zero_stage`, the config's, or its DeepSpeed JSON's."""
    deepspeed_config = config.get("deepspeed_config") or {}
    stage = _flag_value(args, "--zero_stage")
    stage = stage if stage is not None else deepspeed_config.get("zero_stage")
    json_file = _flag_value(args, "--deepspeed_config_file") or deepspeed_config.get("deepspeed_config_file")
    if stage is None and json_file and os.path.isfile(json_file):
        with open(json_file, encoding="utf-8") as f:
            stage = (json.load(f).get("zero_optimization") or {}).get("stage")
    try:
        return None if stage is None else int(stage)
    except (TypeError, ValueError):
        return None


def check_launched_settings(args: list[str], config: dict[str, Any], training_args: Any) -> None:
    """Refuse here, once, the recipe settings that every launched process would refuse only after loading the model:
    ZeRO-3 generation without `ds3_gather_for_generation`, and the least-squares row update under DeepSpeed or FSDP
    (the trainer keeps the same checks, for a launch of one's own)."""
    from trl_laser.config import check_zero3_generation
    from trl_laser.row_update import check_row_update_supported

    distributed_type = config.get("distributed_type")
    deepspeed = distributed_type == "DEEPSPEED" or "--use_deepspeed" in args
    fsdp = distributed_type == "FSDP" or "--use_fsdp" in args
    try:
        if deepspeed:
            gather = getattr(training_args, "ds3_gather_for_generation", True)
            check_zero3_generation(_zero_stage(args, config), gather, getattr(training_args, "use_vllm", False))
        if getattr(training_args, "self_reward_row_update", None) == "least_squares":
            row_only = bool(getattr(training_args, "self_reward_row_only", False))
            check_row_update_supported(False, deepspeed, fsdp, row_only)
    except ValueError as err:
        raise LaunchError(str(err)) from None


def launch_plan(launch_args: list[str], training_args: Any, gpu: bool | None = None) -> tuple[list[str], list[str]]:
    """The arguments of `accelerate launch` for `launch_args` (the recipe's and the command line's), and the training
    settings to add for the launched processes.

    `--accelerate_config X` becomes `--config_file <file>`, checked for what its distributed type needs (its machines:
    `check_machines`; the recipe's settings under it: `check_launched_settings`), and
    `--mixed_precision` follows the recipe's `bf16` / `fp16`. Without a GPU (`gpu=False`; detected when None) the
    launch uses one gloo process group, says so in one line, and refuses what cannot work there (bf16/fp16 under
    DeepSpeed, a GPU-only backend). The processes
    get `--ddp_backend gloo` (with accelerate's default each would believe it is alone) and, outside DeepSpeed,
    `--use_cpu true` (accelerate's multi-CPU mode; DeepSpeed picks its CPU accelerator itself).
    """
    args = list(launch_args)
    config: dict[str, Any] = {}
    value = _flag_value(args, ACCELERATE_CONFIG_FLAG)
    if value is not None:
        path = resolve_accelerate_config(value)
        config = _read_config(path)
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
    extra = [] if gpu else _cpu_settings(deepspeed, wanted, launch_args, training_args)
    # accelerate reads `--config_file`, else its default config, when no `--accelerate_config` names one
    effective = config if value is not None else _read_config(_flag_value(args, "--config_file") or _default_config())
    check_machines(args, effective, _shipped_value(value, "main_process_ip") if value is not None else None)
    check_launched_settings(args, effective, training_args)
    if not gpu:
        print("[trl-laser] No GPU here: the launch runs on CPU, with gloo and fp32 (mixed_precision no).", flush=True)
    return args, extra


def _cpu_settings(deepspeed: bool, precision: str, launch_args: list[str], training_args: Any) -> list[str]:
    """The training settings that the launched processes need on a machine without a GPU; refuses what cannot work
    there."""
    if deepspeed and precision != "no":
        raise LaunchError(
            f"`{precision}: true` cannot train under DeepSpeed on a machine without a GPU (its CPU path is fp32 only): "
            f"set `{precision}: false` in the recipe or pass `--{precision} false`."
        )
    if training_args.ddp_backend not in (None, "gloo"):
        raise LaunchError(
            f"`ddp_backend: {training_args.ddp_backend}` needs a GPU, and this machine has none: drop it or set "
            "`ddp_backend: gloo`."
        )
    # one process has no process group (the launched process would refuse a `ddp_backend` it did not ask for)
    alone = launch_world_size(launch_args) == 1
    extra = [] if training_args.ddp_backend == "gloo" or alone else ["--ddp_backend", "gloo"]
    if not deepspeed and not training_args.use_cpu:
        extra += ["--use_cpu", "true"]
    return extra


def relaunch(
    script: str | os.PathLike,
    script_argv: list[str],
    launch_args: list[str],
    training_args: Any,
    prepare: Callable[[], None] | None = None,
) -> None:
    """Run `script` under `accelerate launch`, with the launch arguments first and the recipe arguments after.

    `prepare` runs once the launch is planned and checked, before any process starts. The launched processes die with
    this one (`launch_lifetime.die_with_launcher`), and an interrupt ends the launch even while it waits for other
    machines (`launch_lifetime.interrupts_end_the_launch`).

    Raises `LaunchedRunFailed` when the launched run fails (it has printed why), `KeyboardInterrupt` when it was
    interrupted (torch.distributed has stopped its processes).
    """
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    accelerate_args, extra = launch_plan(launch_args, training_args)
    if prepare is not None:
        prepare()
    command = accelerate_args + [str(Path(script).resolve())] + script_argv + extra
    print(f"[trl-laser] accelerate launch {shlex.join(command)}", flush=True)
    try:
        with launcher_environment(), interrupts_end_the_launch(INTERRUPT_GRACE_S):
            launch_command(launch_command_parser().parse_args(command))
    except subprocess.CalledProcessError as err:  # one process
        raise LaunchedRunFailed(err.returncode) from None
    except ChildFailedError as err:  # torch.distributed.run's report of the first rank that failed
        rank, failure = err.get_first_failure()
        raise LaunchedRunFailed(failure.exitcode, rank) from None
    except SignalException:  # torch.distributed stopped the processes on SIGINT / SIGTERM
        raise KeyboardInterrupt from None
    except SystemExit as exit_:  # accelerate >= 1.16 stops them itself, then exits with 128 + the signal
        if exit_.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise KeyboardInterrupt from None
        raise
    except KeyboardInterrupt:  # one launched process, which accelerate leaves running
        stop_children(INTERRUPT_GRACE_S)
        raise


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
