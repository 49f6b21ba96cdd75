"""The reward functions of a recipe's `reward_funcs`, by name or dotted import path, as open-r1's `get_reward_funcs`.

The functions themselves live in `trl_laser.answers`; the first one named is LaSeR's 0/1 verifier.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence

from trl_laser.answers import boxed_math_verify_reward, math_verify_reward
from trl_laser.recipe import RecipeError


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
