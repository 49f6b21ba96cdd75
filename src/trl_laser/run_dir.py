"""A run's `output_dir`: its checkpoints, the latest complete one to resume from, and what a new run may write there.

Nothing is written before the first training step (`OutputDirWriter`), so that a run that fails early leaves an
existing folder as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from trl_laser.hub import RECIPE_FILE, save_recipe
from trl_laser.recipe import RecipeError
from trl_laser.settings import SELF_REWARD_CONFIG_NAME


if TYPE_CHECKING:
    from trl_laser.config import LaSeRConfig, LaSeRScriptArguments


_RUN_FILES = ("config.json", "adapter_config.json", "trainer_state.json", RECIPE_FILE, SELF_REWARD_CONFIG_NAME)


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


def is_complete(checkpoint: str) -> bool:
    """transformers writes a checkpoint's `trainer_state.json` last: without a readable one, it was cut off."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(output_dir: str, say: Callable[[str], None] = print) -> str:
    """The newest complete checkpoint in `output_dir`; newer ones cut off while being written are skipped, saying so."""
    found = checkpoints(output_dir)
    for path in reversed(found):
        if is_complete(path):
            return path
        say(f"[trl-laser] Skipping {path}: it has no complete trainer_state.json (the run stopped while writing it).")
    where = f"`output_dir` '{output_dir}'" + ("" if os.path.isdir(output_dir) else " (which does not exist)")
    raise RecipeError(
        f"`resume_from_checkpoint: true` resumes from the latest checkpoint in {where}, but it holds "
        f"{'no complete' if found else 'no'} checkpoint-N folder. Give the path of a checkpoint, the run's "
        "`output_dir`, or drop `resume_from_checkpoint` to start afresh."
    )


def check_output_dir(script_args: LaSeRScriptArguments, training_args: LaSeRConfig) -> list[str]:
    """Resolve `resume_from_checkpoint` (`true`: the latest complete checkpoint) and refuse a new run into an
    `output_dir` that holds a trained model or checkpoints unless `overwrite_output_dir`; returns the old checkpoints
    that the new run replaces. Only reads: nothing is written before training starts.
    """
    output_dir = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("", "false"):
        resume = None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() == "true"):
        resume = latest_checkpoint(output_dir, say=print if training_args.process_index == 0 else lambda _: None)
    elif resume is not None and not is_complete(resume):
        if not os.path.isdir(resume):
            raise RecipeError(f"`resume_from_checkpoint` '{resume}': no such checkpoint folder.")
        raise RecipeError(
            f"`resume_from_checkpoint` '{resume}' has no complete trainer_state.json (the run stopped while writing "
            "it, or it is no checkpoint): give an earlier checkpoint, or `true` for the latest complete one."
        )
    training_args.resume_from_checkpoint = resume
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


class OutputDirWriter(TrainerCallback):
    """Writes into `output_dir` only once the run has made its first step, so that a run that fails before (a bad
    dataset, a LaSeR check on the first batch) leaves an existing folder byte for byte as it was: then the old
    checkpoints that `overwrite_output_dir` replaces are removed (before the first save) and the recipe is written."""

    def __init__(self, recipe: str | None, old_checkpoints: Sequence[str]):
        self.recipe, self.old_checkpoints, self.started = recipe, list(old_checkpoints), False

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
