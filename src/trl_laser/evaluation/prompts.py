"""The prompt of each problem at test time: as the model was trained, unless an argument says otherwise.

`trl-laser train` saves how it built its prompts (system prompt, instruction, separator, chat-template arguments,
dataset seed) with the model; `trl-laser eval` and `trl-laser probe` build the identical prompts from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..data import PAPER_INSTRUCTION, default_instruction, make_conversation
from ..settings import SelfRewardSettings


@dataclasses.dataclass
class Prompt:
    """How each problem becomes a prompt; `None` is unset (an argument not given, or each benchmark's default
    instruction)."""

    system_prompt: str | None = None
    instruction: str | None = None
    instruction_separator: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    dataset_seed: int | None = None

    def conversation(self, problem: str, source: str) -> list:
        """The chat messages of `problem` from the problem set `source` (whose default instruction fills an unset
        one)."""
        instruction = self.instruction if self.instruction is not None else default_instruction(source)
        return make_conversation(problem, self.system_prompt, instruction, self.instruction_separator)


def saved_settings(model_path: str) -> SelfRewardSettings | None:
    """The settings `trl-laser train` saved with the model, or None for a model saved without them."""
    try:
        return SelfRewardSettings.from_pretrained(model_path)
    except FileNotFoundError:
        return None


def resolve_prompt(
    saved: SelfRewardSettings | None, given: Prompt, sources: Sequence[str]
) -> tuple[Prompt, dict[str, str]]:
    """The prompt settings to use, each from the argument (`given`), else the model's saved training settings, else
    the default (`sources`: the problem sets evaluated, whose kind picks the default instruction).

    Also returns where each came from ("argument", "model" or "default"), recorded in the results.
    """
    trained = saved.prompt if saved is not None else None
    default_instruction_ = default_instruction(sources[0]) if len(sources) == 1 else PAPER_INSTRUCTION
    candidates = {
        "system_prompt": (trained.system_prompt if trained else None, None),
        "instruction": (trained.instruction if trained else None, default_instruction_),
        "instruction_separator": (trained.instruction_separator if trained else None, "\n"),
        "chat_template_kwargs": (saved.chat_template_kwargs if saved else None, None),
        "dataset_seed": (trained.dataset_seed if trained else None, 0),
    }
    values, origins = {}, {}
    for key, (from_model, default) in candidates.items():
        if getattr(given, key) is not None:
            values[key], origins[key] = getattr(given, key), "argument"
        elif from_model is not None or (key == "system_prompt" and trained is not None):
            values[key], origins[key] = from_model, "model"
        else:
            values[key], origins[key] = default, "default"
    if len(sources) > 1 and origins["instruction"] == "default":
        # Several problem sets, no saved instruction: each gets its own default (arithmetic's, or the paper's).
        values["instruction"] = None
    return Prompt(**values), origins
