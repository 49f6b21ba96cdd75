"""What a `trl-laser train` command line says: the recipe (YAML) read strictly, and the arguments of `accelerate launch`
split off it.

The recipe gives defaults and the command line wins, over three dataclasses: `LaSeRScriptArguments` (data and
rewards), `LaSeRConfig` (training, LaSeR included) and TRL's `ModelConfig`. Unlike TRL and open-r1, a key that none
of them has is an error naming the nearest valid key, so that a renamed or mistyped setting is never silently lost,
and each recipe value is checked against its field's type as the command line would read it. Keys of `accelerate
launch` (`--num_processes`, `--machine_rank`, ...) and `--accelerate_config NAME|PATH` are kept apart for the relaunch
(`trl_laser.launch`, which also owns the vocabulary of those arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import os
import shlex
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from transformers.hf_argparser import string_to_bool
from trl import ModelConfig, TrlParser

from trl_laser.config import LaSeRConfig, LaSeRScriptArguments
from trl_laser.launch import (
    ACCELERATE_CONFIG_FLAG,
    assumed_world_size,
    command_without,
    launch_options,
    launch_world_size,
)


USAGE = "trl-laser train --config RECIPE.yaml [--key value ...] [--accelerate_config NAME|PATH] [accelerate flags]"
_SECRET_KEYS = ("hub_token",)


class RecipeError(ValueError):
    """Bad input in a recipe or on the command line: reported in one line, without a stack trace."""


# ---------------------------------------------------------------------------------------------------- recipe types
class Mismatch(ValueError):
    """A recipe value that its field's type cannot take."""


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def conform(value: Any, tp: Any, strict: bool = False) -> Any:
    """`value` as the command line would give it to a field of type `tp`, else `Mismatch`.

    A string is read as its text would be on the command line ("1e-5" for a float); a YAML number or boolean for a
    string field becomes its text; a float is never an integer. `strict` takes exact types only, so that a union uses
    the member that fits as is before one that needs a conversion. Types this does not know are left to the class.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for exact in (True,) if strict else (True, False):
            for member in (a for a in args if a is not type(None)):
                try:
                    return conform(value, member, exact)
                except Mismatch:
                    pass
        raise Mismatch
    if origin is typing.Literal:
        for choice in args:
            if (value == choice and type(value) is type(choice)) or (not strict and value == str(choice)):
                return choice
        raise Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise Mismatch
        return [conform(item, args[0] if args else Any) for item in value]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise Mismatch
    return _conform_scalar(value, tp, strict)


def _conform_scalar(value: Any, tp: Any, strict: bool) -> Any:
    """`conform` for a type that is no union, literal or container."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is bool and not strict and isinstance(value, str):
        try:
            return string_to_bool(value)  # as the command line reads it
        except argparse.ArgumentTypeError:
            raise Mismatch from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if tp in (int, float) and not strict and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise Mismatch from None
    if tp is str and (isinstance(value, str) or (not strict and isinstance(value, (bool, int, float)))):
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp) or value in [member.value for member in tp]:
            return value
        raise Mismatch
    if tp in (bool, int, float, str) or strict:
        raise Mismatch
    return value


def _describe(tp: Any) -> str:
    """The type as an error message names it ("an integer or null", "a list of strings")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        return f"a list of {_PLURALS.get(args[0], 'values') if args else 'values'}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in tp)
    if tp is type(None):
        return "null"
    return _NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


def checked_recipe_values(parser: TrlParser, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values, each checked against the type of its field in the parser's dataclasses and converted
    as the command line converts its strings; keys of no field (accelerate's) pass as they are.

    Raises `RecipeError` naming the key, the expected type and the value, before any model loads.
    """
    hints: dict[str, Any] = {}
    for dataclass_type in parser.dataclass_types:
        type_hints = typing.get_type_hints(dataclass_type)
        hints.update({f.name: type_hints[f.name] for f in fields(dataclass_type) if f.init})
    actions = {action.dest: action for action in parser._actions}
    checked = {}
    for key, value in values.items():
        if key not in hints:
            checked[key] = value
            continue
        tp = hints[key]
        try:
            checked[key] = conform(value, tp)
        except Mismatch:
            hint = ""
            if "list" in _describe(tp) and not isinstance(value, (list, tuple, dict)):
                hint = f" Write a YAML list: `{key}: [{value}]`."
            raise RecipeError(f"Recipe key `{key}` must be {_describe(tp)}, got {value!r}.{hint}") from None
        choices = getattr(actions.get(key), "choices", None)
        items = checked[key] if isinstance(checked[key], list) else [checked[key]]
        if choices and any(item is not None and item not in choices for item in items):
            raise RecipeError(f"Recipe key `{key}` must be one of {list(choices)}, got {value!r}.")
    return checked


class RecipeParser(TrlParser):
    """The `TrlParser` of `trl-laser train`, over `LaSeRScriptArguments`, `LaSeRConfig` and `ModelConfig`, with
    abbreviated keys refused. It checks each recipe value against its field's type where the recipe enters: TrlParser
    makes the values argparse defaults, which argparse converts only when they are strings (so `max_steps: 2.5` got
    through)."""

    withheld: frozenset[str] = frozenset()  # recipe keys left out of this parse (`parse_args`)

    def __init__(self, prog: str | None = None):
        dataclass_types = (LaSeRScriptArguments, LaSeRConfig, ModelConfig)
        super().__init__(dataclass_types, prog=prog or "trl-laser train", usage=USAGE, allow_abbrev=False)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        kwargs = {k: v for k, v in kwargs.items() if k not in self.withheld}
        return super().set_defaults_with_config(**checked_recipe_values(self, kwargs))


# ---------------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedArgs:
    """Everything one `trl-laser train` command line says."""

    script_args: LaSeRScriptArguments
    training_args: LaSeRConfig
    model_args: ModelConfig
    launch_args: list[str]  # for `accelerate launch`, from the recipe and the command line
    script_argv: list[str]  # the command line without its accelerate arguments (what the relaunched script gets)
    config_path: str | None


def _unknown_key_error(key: str, origin: str, candidates: Sequence[str]) -> RecipeError:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" Did you mean '{match[0]}'?" if match else ""
    return RecipeError(
        f"Unknown key '{key}' {origin}.{hint} Every valid key is listed by `trl-laser train --help`; keys of "
        "`accelerate launch` (e.g. num_processes) are accepted too."
    )


def _split_launch_args(
    tokens: list[str], origin: str, from_config: bool, actions: dict[str, argparse.Action], candidates: Sequence[str]
) -> list[str]:
    """Check that `tokens` left over by the training parser are `accelerate launch` arguments and return them.

    From a recipe they come as `--key value` pairs (booleans become bare flags); anything else is an unknown key.
    """
    launch: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        option, has_value, _ = token.partition("=")
        if not option.startswith("--"):
            raise RecipeError(f"Unexpected value '{token}' {origin}: values follow a `--key`.")
        name = option[2:]
        action = actions.get(option)
        if option == ACCELERATE_CONFIG_FLAG or (action is not None and action.nargs != 0):
            if has_value:
                launch.append(token)
                i += 1
            elif i + 1 < len(tokens) and (from_config or not tokens[i + 1].startswith("--")):
                launch += [option, tokens[i + 1]]
                i += 2
            else:
                raise RecipeError(f"`{option}` {origin} needs a value.")
        elif action is not None:  # a flag of accelerate launch (e.g. --multi_gpu)
            if from_config:
                if str(tokens[i + 1]).lower() in ("true", "1", "yes"):
                    launch.append(option)
                i += 2
            else:
                launch.append(option)
                i += 1
        else:
            raise _unknown_key_error(name.replace("-", "_"), origin, candidates)
    return launch


def _subtract(argv: list[str], removed: list[str]) -> list[str]:
    """`argv` without the ordered subsequence `removed` (the accelerate arguments given on the command line)."""
    out, pending = [], iter(removed)
    current = next(pending, None)
    for item in argv:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            out.append(item)
    return out


def _read_recipe(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """The recipe file that `--config` names (the first, as TrlParser reads it) and its keys; `{}` without one."""
    import yaml

    if "--config" not in argv:
        return None, {}
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise RecipeError("`--config` needs the path of a recipe YAML file.")
    config_path = argv[index + 1]
    if not os.path.isfile(config_path):
        raise RecipeError(f"Recipe file '{config_path}' does not exist.")
    try:
        with open(config_path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe '{config_path}' is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(content, dict):
        raise RecipeError(f"Recipe '{config_path}' must be a YAML mapping of keys to values.")
    return config_path, content


def _withhold_ddp_backend(
    parser: RecipeParser, argv: list[str], backend: str | None, world_size: int | None
) -> list[str]:
    """`argv` for the training parser: without `ddp_backend` when this process only plans a launch.

    accelerate starts a process group for any `ddp_backend`, and fails without a launcher's environment: this process
    only plans the launch (the launched ones get the setting), or trains alone.
    """
    if not backend or "WORLD_SIZE" in os.environ:
        return argv
    if not world_size or world_size < 2:
        raise RecipeError(
            f"`ddp_backend: {backend}` sets the backend of several processes, and this run has one: drop it, or "
            "launch several (`--num_processes N`, or `--accelerate_config NAME`)."
        )
    parser.withheld = frozenset({"ddp_backend"})
    return command_without(argv, "--ddp_backend")


def _parse_dataclasses(parser: RecipeParser, argv: list[str], world_size: int | None) -> tuple:
    """The three dataclasses, then the recipe's and the command line's leftover strings (accelerate's, if valid).

    A launch's batch sizes are checked for the processes that will train (`world_size`), not for this one.
    """
    try:
        with assumed_world_size(world_size, LaSeRConfig) if world_size else contextlib.nullcontext():
            return parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except (ValueError, TypeError) as err:  # a dataclass' own check, e.g. LaSeRConfig refusing temperature != 1
        message = " ".join(str(err).split())
        if "assign use_cpu" in message:  # transformers' advice when bf16 is on without a GPU that has it
            message = (
                "This machine has no GPU with bf16 support, and `bf16` is on (TRL's default when the recipe does not "
                "set it) or `bf16_full_eval` is: set `bf16: false` in the recipe, or pass `--bf16 false`."
            )
        raise RecipeError(message) from None


def parse_args(argv: Sequence[str], parser: RecipeParser | None = None) -> ParsedArgs:
    """Parse a `trl-laser train` command line strictly: the recipe gives defaults, the command line wins.

    Raises `RecipeError` for an unknown key (with the nearest valid one), a missing recipe file, or a value that a
    setting refuses; `--help` prints the help and exits.
    """
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    config_path, content = _read_recipe(argv)
    parser = parser if parser is not None else RecipeParser()
    actions = launch_options()
    candidates = sorted({a.dest for a in parser._actions if a.dest != "help"} | {"accelerate_config"})
    candidates += sorted({o[2:] for o in actions})
    # Unknown keys first, before any setting's own checks can fail on a value that the unknown key was meant to set.
    valid = set(candidates) | {"env"}
    for key in content:
        if key not in valid:
            raise _unknown_key_error(str(key), f"in recipe '{config_path}'", candidates)
    cli_values, cli_rest = parser.parse_known_args(command_without(argv, "--config"))
    # The recipe's launch keys, before the command line's (which win).
    early_launch = [f"--{k}={content[k]}" for k in (ACCELERATE_CONFIG_FLAG[2:], "num_processes") if k in content]
    early_launch += _split_launch_args(cli_rest, "on the command line", False, actions, candidates)
    world_size = launch_world_size(early_launch) if early_launch else None
    backend = cli_values.ddp_backend or content.get("ddp_backend")
    parse_argv = _withhold_ddp_backend(parser, list(argv), backend, world_size)

    *dataclasses_, config_rest, cli_rest = _parse_dataclasses(parser, parse_argv, world_size)
    script_args, training_args, model_args = dataclasses_
    if backend and parser.withheld:
        training_args.ddp_backend = backend  # for planning the launch (`launch.launch_plan`)
    launch = _split_launch_args(config_rest, f"in recipe '{config_path}'", True, actions, candidates)
    cli_launch = _split_launch_args(cli_rest, "on the command line", False, actions, candidates)
    return ParsedArgs(
        script_args=script_args,
        training_args=training_args,
        model_args=model_args,
        launch_args=launch + cli_launch,
        script_argv=_subtract(list(argv), cli_rest),
        config_path=config_path,
    )


def recipe_text(parsed: ParsedArgs) -> str:
    """The recipe as run: the command line (secrets hidden), then the YAML file's content."""
    argv = list(parsed.script_argv)
    for i, arg in enumerate(argv[:-1]):
        if arg.lstrip("-") in _SECRET_KEYS:
            argv[i + 1] = "***"
    lines = [f"# trl-laser train {shlex.join(argv)}".rstrip()]
    if parsed.config_path:
        with open(parsed.config_path, encoding="utf-8") as f:
            for line in f.read().rstrip("\n").splitlines():
                key = line.split(":", 1)[0].strip()
                lines.append(f"{key}: '***'" if key in _SECRET_KEYS else line)
    return "\n".join(lines) + "\n"
