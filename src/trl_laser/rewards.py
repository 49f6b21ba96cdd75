"""The 0/1 verifier reward functions, and those of a recipe's `reward_funcs` by name or dotted import path (open-r1's
`get_reward_funcs`). The first reward function is LaSeR's verifier; the checks themselves are `trl_laser.answers`'.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trl_laser.answers import completion_text, content_text, is_correct, is_correct_boxed
from trl_laser.recipe import RecipeError


def math_verify_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 if the completion's answer equals the dataset's `answer` column, else 0.0.

    This is the 0/1 verifier reward that LaSeR's self-rewarding score is trained to predict.
    """
    return [float(is_correct(completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]


def asks_for_answer_tags(prompt: Any) -> bool:
    """Whether a prompt (text, or chat messages as TRL passes them) holds both `<answer>` and `</answer>`, as
    Open-Reasoner-Zero's does: the official reward then applies its R1 format check (`official_answer`)."""
    text = prompt if isinstance(prompt, str) else " ".join(content_text(m.get("content")) for m in prompt)
    return "<answer>" in text and "</answer>" in text


def boxed_math_verify_reward(
    completions: list, answer: list, prompts: list | None = None, **kwargs: Any
) -> list[float]:
    """TRL reward function, the official LaSeR verifier: 1.0 if the completion's official answer equals `answer`.

    0.0 when there is no box or more than one, and no fallback to `$...$` or plain numbers (`single_boxed`). When a
    prompt asks for `<answer>` tags, the official R1 format check decides instead (`official_answer`); TRL passes the
    prompts. The paper recipes use it; models that never box (SmolLM2) get 0 everywhere and need `math_verify_reward`.
    """
    tags = [False] * len(completions) if prompts is None else [asks_for_answer_tags(p) for p in prompts]
    return [
        float(a is not None and is_correct_boxed(completion_text(c), str(a), t))
        for c, a, t in zip(completions, answer, tags, strict=True)
    ]


REWARD_FUNCS_REGISTRY: dict[str, Callable] = {
    "math_verify_reward": math_verify_reward,
    "boxed_math_verify_reward": boxed_math_verify_reward,
}


def get_reward_funcs(names: Sequence[str]) -> list[Callable]:
    """The reward functions that `names` give: registry names, or `module.function` paths importable from here.

    Raises `RecipeError` naming the function that is unknown or cannot be imported, or saying that there is none.
    """
    funcs = []
    for name in names:
        if name in REWARD_FUNCS_REGISTRY:
            funcs.append(REWARD_FUNCS_REGISTRY[name])
        elif "." in name:
            module_path, attr = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:  # reward modules next to the recipe, as in TRL's scripts
                sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module_path), attr))
            except (ImportError, AttributeError) as err:
                raise RecipeError(f"`reward_funcs`: could not import '{name}' ({err}).") from None
        else:
            raise RecipeError(
                f"`reward_funcs`: unknown reward function '{name}'. Use one of {sorted(REWARD_FUNCS_REGISTRY)} or a "
                "dotted import path (module.function)."
            )
    if not funcs:
        raise RecipeError("`reward_funcs` is empty: LaSeR needs a 0/1 verifier reward (e.g. math_verify_reward).")
    return funcs


def check_verifier_values(values: torch.Tensor, name: str) -> None:
    """LaSeR's target is the verifier's 0/1 (NaN: no value); anything else is an error naming the function."""
    bad = ~(torch.isnan(values) | (values == 0) | (values == 1))
    if bad.any():
        raise ValueError(
            f"The verifier reward function {name!r} returned {values[bad][0].item()}, but LaSeR's self-reward target "
            "must be 0 or 1 (or None to leave a completion out). Set `self_reward_verifier` to the name of a 0/1 "
            "reward function, or make this one return 0/1."
        )


def verifier_index(name: str | None, names: Sequence[str], funcs: Sequence[Any]) -> int:
    """Which reward function is LaSeR's 0/1 verifier: the one `self_reward_verifier` names, else the first. A reward
    model is refused, its scores are not a 0/1 target."""
    if name is None:
        index = 0
    elif name in names:
        index = list(names).index(name)
    else:
        raise ValueError(
            f"`self_reward_verifier={name!r}` is not among the reward functions {list(names)}. Set it to the name of "
            "the function that returns the 0/1 verifier reward."
        )
    if isinstance(funcs[index], torch.nn.Module):
        raise ValueError(
            f"The verifier reward {names[index]!r} is a reward model, whose scores are not LaSeR's 0/1 target. Put the "
            "0/1 verifier function first in `reward_funcs`, or name it with `self_reward_verifier`."
        )
    return index
