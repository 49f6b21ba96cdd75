"""A run's `output_dir`: its checkpoints, the latest complete one to resume from, whether resuming from it continues
the run as it ran, and what a new run may write there.

Nothing is written before the first training step (`OutputDirWriter`), so that a run that fails early leaves an
existing folder as it was; a resume that cannot continue the run as it ran (an incomplete checkpoint, another
learning-rate schedule, a run that is finished) is refused or ends before anything loads.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from trl_laser.hub import RECIPE_FILE, save_recipe
from trl_laser.recipe import RecipeError
from trl_laser.row_update import ROW_STATE_NAME
from trl_laser.settings import SELF_REWARD_CONFIG_NAME


if TYPE_CHECKING:
    from trl_laser.config import LaSeRConfig, LaSeRScriptArguments


_RUN_FILES = ("config.json", "adapter_config.json", "trainer_state.json", RECIPE_FILE, SELF_REWARD_CONFIG_NAME)
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)
# What a checkpoint lacking each state would resume with (transformers resumes without them, silently).
_STATES = {
    "optimizer.pt": "a fresh optimizer",
    "scheduler.pt": "its learning-rate schedule started over (the learning rate back at its peak)",
    "rng_state.pth": "other random draws than the run's",
    ROW_STATE_NAME: "a fresh least-squares row update",
}
# Schedules whose learning rate does not depend on the number of steps (a longer run keeps them).
_STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")


class RunFinished(Exception):
    """`resume_from_checkpoint` names a run that has trained its `max_steps` already: there is nothing to do."""


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match[1]), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def _cut_short(path: str) -> bool:
    """Whether a weights or state file ends before its own header says it does (a write that was cut off)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors"):
            if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
                return True
            length = int.from_bytes(head, "little")
            try:
                header = json.loads(f.read(length))
            except ValueError:
                return True
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
            return 8 + length + max(ends, default=0) > size
    # torch.save writes a zip archive, whose directory is at its very end
    return size == 0 or (head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path))


def _weights_problem(checkpoint: str, name: str) -> str | None:
    """What is wrong with the weights file `name` of `checkpoint` (or the shards its index names), or None."""
    path = os.path.join(checkpoint, name)
    files = [name]
    if name.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return f"its {name} is cut short (the run stopped while writing it)"
    for shard in files:
        if not os.path.isfile(os.path.join(checkpoint, shard)):
            return f"its {shard} is missing"
        if _cut_short(os.path.join(checkpoint, shard)):
            return f"its {shard} is cut short (the run stopped while writing it)"
    return None


def _deepspeed_states(checkpoint: str) -> str | None:
    """The folder in which DeepSpeed saved the optimizer state (named by its `latest` file), or None."""
    try:
        with open(os.path.join(checkpoint, "latest"), encoding="utf-8") as f:
            folder = os.path.join(checkpoint, f.read().strip())
    except OSError:
        return None
    return folder if os.path.isdir(folder) else None


def checkpoint_problem(checkpoint: str, row_update: bool = False) -> str | None:
    """What keeps `checkpoint` from continuing its run as it ran, in words ("its optimizer.pt is missing, ..."), or
    None when it is complete.

    transformers writes `trainer_state.json` last, so a checkpoint cut off while being written has none; without the
    optimizer, scheduler or RNG state (`save_only_model`, a partial copy) transformers resumes silently with a fresh
    optimizer and schedule; weights cut short fail deep inside safetensors. `row_update`: the run updates z_c's row by
    least squares, whose state the checkpoint must hold too.
    """
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "it has no complete trainer_state.json (the run stopped while writing it)"
    names = set(os.listdir(checkpoint))
    deepspeed = _deepspeed_states(checkpoint)
    weights = [name for name in _WEIGHTS if name in names]
    if not weights and deepspeed is None:
        return "it holds no model weights (model.safetensors is missing)"
    for name in weights:
        problem = _weights_problem(checkpoint, name)
        if problem:
            return problem
    states: list[tuple[str, list[str]]] = [
        ("rng_state.pth", [n for n in names if re.fullmatch(r"rng_state(_\d+)?\.pth", n)])
    ]
    if deepspeed is None:  # DeepSpeed saves the optimizer (and a scheduler of its own) in its folder
        optimizer = [n for n in ("optimizer.pt", "optimizer.bin") if n in names]
        optimizer += [n for n in names if "optimizer" in n and os.path.isdir(os.path.join(checkpoint, n))]  # FSDP
        states += [("optimizer.pt", optimizer), ("scheduler.pt", [n for n in ("scheduler.pt",) if n in names])]
    else:
        optim = [os.path.join(os.path.basename(deepspeed), n) for n in os.listdir(deepspeed) if "optim_states" in n]
        states.append(("optimizer.pt", optim))
    if row_update:
        states.append((ROW_STATE_NAME, [ROW_STATE_NAME] if ROW_STATE_NAME in names else []))
    for state, found in states:
        if not found:
            return f"its {state} is missing (resuming from it would continue with {_STATES[state]})"
        for name in found:
            path = os.path.join(checkpoint, name)
            if os.path.isfile(path) and _cut_short(path):
                return f"its {name} is cut short (the run stopped while writing it)"
    return None


def is_complete(checkpoint: str, row_update: bool = False) -> bool:
    """Whether `checkpoint` holds everything to continue its run as it ran (`checkpoint_problem`)."""
    return checkpoint_problem(checkpoint, row_update) is None


def latest_checkpoint(output_dir: str, say: Callable[[str], None] = print, row_update: bool = False) -> str:
    """The newest complete checkpoint in `output_dir`; newer incomplete ones (cut off while being written, or
    without their optimizer state) are skipped, saying so and which one the run resumes from."""
    found = checkpoints(output_dir)
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path, row_update)
        if problem is None:
            for older, why in skipped:
                say(f"[trl-laser] Skipping {older}: {why}; resuming from {path}.")
            return path
        skipped.append((path, problem))
    for older, why in skipped:
        say(f"[trl-laser] Skipping {older}: {why}.")
    where = f"`output_dir` '{output_dir}'" + ("" if os.path.isdir(output_dir) else " (which does not exist)")
    raise RecipeError(
        f"`resume_from_checkpoint: true` resumes from the latest checkpoint in {where}, but it holds "
        f"{'no complete' if found else 'no'} checkpoint-N folder. Give the path of a checkpoint, the run's "
        "`output_dir`, or drop `resume_from_checkpoint` to start afresh."
    )


def _check_given_checkpoint(checkpoint: str, row_update: bool) -> None:
    """Refuse a `resume_from_checkpoint` path that is no complete checkpoint, naming what is missing and the earlier
    complete checkpoint of its run."""
    if not os.path.isdir(checkpoint):
        raise RecipeError(f"`resume_from_checkpoint` '{checkpoint}': no such checkpoint folder.")
    problem = checkpoint_problem(checkpoint, row_update)
    if problem is None:
        return
    name = os.path.basename(os.path.normpath(checkpoint))
    match = re.fullmatch(r"checkpoint-(\d+)", name)
    earlier = [
        path
        for path in checkpoints(os.path.dirname(os.path.normpath(checkpoint)))
        if match and int(path.rsplit("-", 1)[1]) < int(match[1]) and is_complete(path, row_update)
    ]
    if problem.startswith("it has no complete trainer_state.json"):
        advice = "it is no checkpoint): give an earlier checkpoint, or `true` for the latest complete one."
        raise RecipeError(
            f"`resume_from_checkpoint` '{checkpoint}' has no complete trainer_state.json (the run stopped while "
            f"writing it, or {advice}"
        )
    hint = f"its earlier complete checkpoint is {earlier[-1]}" if earlier else "its run has no earlier complete one"
    raise RecipeError(
        f"`resume_from_checkpoint` '{checkpoint}' cannot continue its run: {problem}. Give a complete checkpoint "
        f"({hint}), or `true` for the latest complete one."
    )


# ---------------------------------------------------------------------------------------------------- what ran
class _Saved:
    """Any object of a pickled `training_args.bin`, kept as data: its arguments and state, nothing of it is run."""

    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DataUnpickler(pickle.Unpickler):
    """Reads a pickle without importing or calling anything that it names: every class is a `_Saved`."""

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Saved,), {})

    def persistent_load(self, pid: Any) -> None:
        return None


def _plain(value: Any) -> Any:
    """An enum member (`SchedulerType('linear')`) of a saved pickle as its value."""
    if isinstance(value, _Saved) and len(value.args) == 1:
        return value.args[0]
    return value


def saved_training_args(checkpoint: str) -> dict[str, Any] | None:
    """The training arguments that `checkpoint` was trained with (transformers saves them in `training_args.bin`),
    read as plain data without unpickling any object; None if it has none that can be read."""
    try:
        with zipfile.ZipFile(os.path.join(checkpoint, "training_args.bin")) as archive:
            [name] = [n for n in archive.namelist() if n.endswith("data.pkl")]
            saved = _DataUnpickler(io.BytesIO(archive.read(name))).load()
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError):
        return None
    state = saved.state if isinstance(saved, _Saved) else None
    if isinstance(state, tuple):  # (dict, slots)
        state = state[0]
    return {k: _plain(v) for k, v in state.items()} if isinstance(state, dict) else None


def _schedule_type(value: Any) -> str:
    return str(getattr(value, "value", value))


def _depends_on_length(args: dict[str, Any]) -> bool:
    """Whether a learning-rate schedule changes with the number of steps (a decay, or a warm-up given as a ratio)."""
    warmup = float(args.get("warmup_steps") or 0)
    return _schedule_type(args.get("lr_scheduler_type")) not in _STEP_FREE_SCHEDULES or 0 < warmup < 1


def schedule_differences(training_args: LaSeRConfig, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(setting, this run's value, the checkpoint's value)` for each learning-rate schedule setting in which a run
    resumed from a checkpoint departs from the one the checkpoint was trained with (`saved`): the checkpoint's
    scheduler state carries its own schedule on, whatever this run says. `max_steps` (or `num_train_epochs`) counts
    only for a schedule that depends on the run's length."""
    here = {
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": _schedule_type(training_args.lr_scheduler_type),
        "lr_scheduler_kwargs": training_args.lr_scheduler_kwargs or {},
        "warmup_steps": training_args.warmup_steps,
    }
    there = {**saved, "lr_scheduler_type": _schedule_type(saved.get("lr_scheduler_type"))}
    there["lr_scheduler_kwargs"] = saved.get("lr_scheduler_kwargs") or {}
    if _depends_on_length(there):
        here["max_steps"] = training_args.max_steps
        if training_args.max_steps == saved.get("max_steps") == -1:
            here["num_train_epochs"] = training_args.num_train_epochs
    differences = []
    for key, value in here.items():
        if key not in there:
            continue
        old = there[key]
        same = (
            math.isclose(float(value), float(old), rel_tol=1e-9)
            if isinstance(value, (int, float)) and isinstance(old, (int, float))
            else value == old
        )
        if not same:
            differences.append((f"`{key}`", value, old))
    return differences


def _trainer_state(checkpoint: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def check_resume(training_args: LaSeRConfig, checkpoint: str) -> None:
    """Refuse (`RecipeError`) to resume from `checkpoint` with another learning-rate schedule than it was trained with,
    listing the differences; raise `RunFinished` when it has trained this run's `max_steps` already."""
    saved = saved_training_args(checkpoint)
    differences = schedule_differences(training_args, saved) if saved is not None else []
    if differences:
        listed = "; ".join(
            f"{name} is {here!r} here but {there!r} in the checkpoint" for name, here, there in differences
        )
        longer = ""
        if any(name in ("`max_steps`", "`num_train_epochs`") for name, _, _ in differences):
            longer = (
                f" Its `lr_scheduler_type: {_schedule_type(saved.get('lr_scheduler_type'))}` schedule depends on the "
                "run's length: to train it longer, start a new run from its weights."
            )
        raise RecipeError(
            f"Resuming from {checkpoint} with a learning-rate schedule other than the one it was trained with: "
            f"{listed}. Its scheduler state carries its own schedule on, so the new one would silently not apply."
            f"{longer} Resume with the checkpoint's values, or start a new run in a new `output_dir` (load the model "
            "from the checkpoint to start from its weights)."
        )
    state = _trainer_state(checkpoint)
    step = int(state.get("global_step", 0))
    target = training_args.max_steps
    if target <= 0 and (saved is None or saved.get("num_train_epochs") == training_args.num_train_epochs):
        target = int(state.get("max_steps", 0) or 0)
    if target <= 0 or step < target:
        return
    run = os.path.dirname(os.path.normpath(checkpoint))
    saved_model = any(os.path.isfile(os.path.join(run, name)) for name in ("config.json", "adapter_config.json"))
    where = f"its model is in {run}" if saved_model else f"its final model was not saved: {checkpoint} holds it"
    steps = "`max_steps`" if training_args.max_steps > 0 else "`num_train_epochs`"
    if saved is not None and _depends_on_length(saved):
        further = (
            f"its `lr_scheduler_type: {_schedule_type(saved.get('lr_scheduler_type'))}` schedule has ended, so to "
            "train it further start a new run from its weights (`--model_name_or_path` the model, a new `output_dir`)"
        )
    else:
        further = f"to train it further, raise {steps}"
    raise RunFinished(
        f"[trl-laser] The run is finished: {checkpoint} is at step {step} and {steps} gives {target} steps, so there "
        f"is nothing to resume ({where}). Nothing was changed; {further}."
    )


def resumed_recipe(checkpoint: str, recipe: str) -> str:
    """The recipe to save for a run resumed from `checkpoint`: the saved recipe of the run that trained it, then the
    command that resumed it (and its recipe file, if that has changed), so that the saved recipe says what ran."""
    for folder in (checkpoint, os.path.dirname(os.path.normpath(checkpoint))):
        path = os.path.join(folder, RECIPE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                original = f.read().rstrip("\n")
            break
    else:
        return recipe
    command, _, body = recipe.partition("\n")
    step = _trainer_state(checkpoint).get("global_step")
    lines = [original, f"# Resumed from {checkpoint} (step {step}) with:", command]
    if body.strip() and body.strip() not in original:
        lines += ["# and the recipe file as it was then:"] + [f"# {line}".rstrip() for line in body.splitlines()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- output dir
def check_output_dir(
    script_args: LaSeRScriptArguments, training_args: LaSeRConfig, say: Callable[[str], None] | None = None
) -> list[str]:
    """Resolve `resume_from_checkpoint` (`true`: the latest complete checkpoint) and check that resuming from it
    continues the run as it ran (`check_resume`), or refuse a new run into an `output_dir` that holds a trained model
    or checkpoints unless `overwrite_output_dir` (and, with `fit_row_problems`, a used `<output_dir>-fit`); returns the
    old checkpoints that the new run replaces. Only reads:
    nothing is written before training starts. `say` prints the checkpoints skipped (default: the main process).
    """
    output_dir = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    if say is None:
        say = print if training_args.process_index == 0 else lambda _: None
    row_update = training_args.self_reward_row_update == "least_squares"
    if isinstance(resume, str) and resume.strip().lower() in ("", "false"):
        resume = None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() == "true"):
        resume = latest_checkpoint(output_dir, say=say, row_update=row_update)
    elif resume is not None:
        _check_given_checkpoint(resume, row_update)
    if resume is not None:
        check_resume(training_args, resume)
    training_args.resume_from_checkpoint = resume
    _check_fit_dir(script_args, output_dir)
    if resume is not None or not os.path.isdir(output_dir):
        return []
    old = checkpoints(output_dir)
    names = os.listdir(output_dir)
    model = [n for n in names if n in _RUN_FILES or n.endswith((".safetensors", ".bin", ".pt"))]
    if (old or model) and not script_args.overwrite_output_dir:
        held = ", ".join([os.path.basename(p) for p in old][-3:] + sorted(model)[:3])
        raise RecipeError(
            f"`output_dir` '{output_dir}' already holds a run ({held}): a new run would overwrite its model and "
            "mix its checkpoints with the new ones. Pass `--resume_from_checkpoint true` to continue it from its "
            "latest checkpoint, `--overwrite_output_dir true` to replace it, or another `output_dir`."
        )
    return old


def fit_dir(output_dir: str) -> str:
    """Where the model with z_c's row refitted after training goes (`fit_row_problems`, or the printed `fit-row`)."""
    return os.path.normpath(output_dir) + "-fit"


def _check_fit_dir(script_args: LaSeRScriptArguments, output_dir: str) -> None:
    """Refuse, before training, a refit after it into a folder that holds files, unless `overwrite_output_dir`."""
    fitted = fit_dir(output_dir)
    if script_args.fit_row_problems and not script_args.overwrite_output_dir:
        if os.path.isdir(fitted) and os.listdir(fitted):
            raise RecipeError(
                f"`fit_row_problems`: '{fitted}', where the row refitted after training goes, already holds files (an "
                "earlier fit?). Pass `--overwrite_output_dir true` to replace them, or another `output_dir`."
            )


class OutputDirWriter(TrainerCallback):
    """Writes into `output_dir` only once the run has made its first step, so that a run that fails before (a bad
    dataset, a LaSeR check on the first batch) leaves an existing folder byte for byte as it was: then the old
    checkpoints that `overwrite_output_dir` replaces are removed (before the first save) and the recipe is written.

    `training_began` tells whether the trainer got past its set-up (the model, optimizer and a resumed checkpoint
    loaded): an error before is one of the run's settings."""

    def __init__(self, recipe: str | None, old_checkpoints: Sequence[str]):
        self.recipe, self.old_checkpoints, self.started = recipe, list(old_checkpoints), False
        self.training_began = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_began = True

    def on_step_end(self, args, state, control, **kwargs):
        from accelerate import PartialState

        if self.started:
            return
        self.started = True
        if state.is_world_process_zero:
            for path in self.old_checkpoints:
                shutil.rmtree(path)
            if self.old_checkpoints:
                names = ", ".join(os.path.basename(p) for p in self.old_checkpoints)
                print(f"[trl-laser] overwrite_output_dir: removed the old checkpoints of {args.output_dir} ({names}).")
            if self.recipe is not None:
                save_recipe(args.output_dir, self.recipe)
        if self.old_checkpoints:  # no process saves into a checkpoint folder that is being removed
            PartialState().wait_for_everyone()
