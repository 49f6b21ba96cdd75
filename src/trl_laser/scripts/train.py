"""`trl-laser train`: LaSeR (or its GRPO baseline) from a recipe, the way `trl grpo` trains GRPO.

    trl-laser train --config recipes/quickstart/laser/config_smollm2_arithmetic.yaml [--key value ...]
    trl-laser train --config recipes/Qwen2.5-7B/laser/config_deepmath.yaml --accelerate_config zero3

The recipe (YAML) gives defaults and the command line wins, over three dataclasses: `LaSeRScriptArguments` (data and
rewards), `LaSeRConfig` (training, LaSeR included) and TRL's `ModelConfig`. Unlike TRL and open-r1, a key that none
of them has is an error naming the nearest valid key, so that a renamed or mistyped setting is never silently lost.
Keys of `accelerate launch` (`--num_processes`, `--machine_rank`, ...) and `--accelerate_config NAME|PATH` relaunch this
script through `accelerate launch` (`trl_laser.launch`, which also adapts the launch to a machine without a GPU).
"""

import argparse
import contextlib
import difflib
import enum
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainerCallback
from transformers.hf_argparser import string_to_bool

from trl_laser.hub import RECIPE_FILE
from trl_laser.launch import (
    ACCELERATE_CONFIG_FLAG,
    LaunchedRunFailed,
    LaunchError,
    assumed_world_size,
    command_without,
    launch_world_size,
    relaunch,
    skip_deepspeed_shm_build,
)
from trl_laser.settings import SELF_REWARD_CONFIG_NAME


_SECRET_KEYS = ("hub_token",)
TRACEBACK_ENV = "TRL_LASER_TRACEBACK"  # set to 1 for the full trace of an error raised while training
USAGE = "trl-laser train --config RECIPE.yaml [--key value ...] [--accelerate_config NAME|PATH] [accelerate flags]"


@dataclass
class LaSeRScriptArguments:
    """Data and reward settings of `trl-laser train` (the training settings are `LaSeRConfig`'s)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name, local JSON/JSONL/parquet/CSV file, or `builtin:arithmetic` (generated, no "
            "network)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on (only with `eval_strategy` other than `no`)."}
    )
    problem_column: str = field(default="problem", metadata={"help": "Column holding the problem text."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column holding the gold answer that the verifier checks."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message of every prompt."})
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "Text appended to every problem. Default: the paper's 'Please reason step by step, and put your "
            "final answer within \\boxed{}.', or 'Answer with just the number.' for builtin:arithmetic. '' for none."
        },
    )
    instruction_separator: str = field(
        default=" ",
        metadata={
            "help": "What joins the problem and the instruction: ' ' (default), as the official LaSeR training data; "
            "'\\n' in the SmolLM2 recipes, whose results were measured with it."
        },
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated builtin:arithmetic problems."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop problems whose prompt (chat template applied) is longer than this many tokens, as the "
            "paper's `filter_overlong_prompts` with 2048."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N problems only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N problems only."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_verify_reward"],
        metadata={
            "help": "Reward functions, the first being LaSeR's 0/1 verifier: `math_verify_reward` (default; the last "
            "box, else the last $...$ math or number), `boxed_math_verify_reward` (the official LaSeR verifier: exactly "
            "one \\boxed{}, no fallback), or dotted import paths such as `my_lib.rewards.my_reward`."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `output_dir` that already holds a trained model or checkpoints (refused "
            "otherwise, so that nothing is lost): its old checkpoint-N folders are removed once the new run has made "
            "its first step, and its model files are replaced when it ends. To continue a run instead, use "
            "`resume_from_checkpoint: true` (the latest checkpoint in `output_dir`)."
        },
    )


class RecipeError(ValueError):
    """Bad input in a recipe or on the command line: reported in one line, without a stack trace."""


def _reward_registry() -> dict[str, Callable]:
    from trl_laser.answers import boxed_math_verify_reward, math_verify_reward

    return {"math_verify_reward": math_verify_reward, "boxed_math_verify_reward": boxed_math_verify_reward}


def make_parser(prog: str | None = None):
    """The `TrlParser` over `LaSeRScriptArguments`, `LaSeRConfig` and `ModelConfig`; abbreviated keys are refused."""
    from trl import ModelConfig, TrlParser

    from trl_laser.config import LaSeRConfig

    class RecipeParser(TrlParser):
        """Checks each recipe value against its field's type where the recipe enters: TrlParser makes the values
        argparse defaults, which argparse converts only when they are strings (so `max_steps: 2.5` got through)."""

        withheld: frozenset[str] = frozenset()  # recipe keys left out of this parse (`parse_args`)

        def set_defaults_with_config(self, **kwargs) -> list[str]:
            kwargs = {k: v for k, v in kwargs.items() if k not in self.withheld}
            return super().set_defaults_with_config(**checked_recipe_values(self, kwargs))

    return RecipeParser(
        (LaSeRScriptArguments, LaSeRConfig, ModelConfig),
        prog=prog or "trl-laser train",
        usage=USAGE,
        allow_abbrev=False,
    )


# ---------------------------------------------------------------------------------------------------- recipe types
class _Mismatch(ValueError):
    """A recipe value that its field's type cannot take."""


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _conform(value: Any, tp: Any, strict: bool = False) -> Any:
    """`value` as the command line would give it to a field of type `tp`, else `_Mismatch`.

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
                    return _conform(value, member, exact)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is typing.Literal:
        for choice in args:
            if (value == choice and type(value) is type(choice)) or (not strict and value == str(choice)):
                return choice
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_conform(item, args[0] if args else Any) for item in value]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if tp is bool and isinstance(value, bool):
        return value
    if tp is bool and not strict and isinstance(value, str):
        try:
            return string_to_bool(value)  # as the command line reads it
        except argparse.ArgumentTypeError:
            raise _Mismatch from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if tp in (int, float) and not strict and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise _Mismatch from None
    if tp is str and (isinstance(value, str) or (not strict and isinstance(value, (bool, int, float)))):
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp) or value in [member.value for member in tp]:
            return value
        raise _Mismatch
    if tp in (bool, int, float, str) or strict:
        raise _Mismatch
    return value


def _describe(tp: Any) -> str:
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


def checked_recipe_values(parser, values: dict[str, Any]) -> dict[str, Any]:
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
            checked[key] = _conform(value, tp)
        except _Mismatch:
            hint = ""
            if "list" in _describe(tp) and not isinstance(value, (list, tuple, dict)):
                hint = f" Write a YAML list: `{key}: [{value}]`."
            raise RecipeError(f"Recipe key `{key}` must be {_describe(tp)}, got {value!r}.{hint}") from None
        choices = getattr(actions.get(key), "choices", None)
        items = checked[key] if isinstance(checked[key], list) else [checked[key]]
        if choices and any(item is not None and item not in choices for item in items):
            raise RecipeError(f"Recipe key `{key}` must be one of {list(choices)}, got {value!r}.")
    return checked


# ---------------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedArgs:
    """Everything one `trl-laser train` command line says."""

    script_args: LaSeRScriptArguments
    training_args: Any  # LaSeRConfig
    model_args: Any  # trl.ModelConfig
    launch_args: list[str]  # for `accelerate launch`, from the recipe and the command line
    script_argv: list[str]  # the command line without its accelerate arguments (what the relaunched script gets)
    config_path: str | None


def _launch_actions() -> dict[str, argparse.Action]:
    """The options of `accelerate launch`, by option string."""
    from accelerate.commands.launch import launch_command_parser

    actions = {}
    for action in launch_command_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                actions[option] = action
    return actions


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


def parse_args(argv: Sequence[str], parser=None) -> ParsedArgs:
    """Parse a `trl-laser train` command line strictly: the recipe gives defaults, the command line wins.

    Raises `RecipeError` for an unknown key (with the nearest valid one), a missing recipe file, or a value that a
    setting refuses; `--help` prints the help and exits.
    """
    import yaml

    from trl_laser.config import LaSeRConfig

    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    config_path = None
    if "--config" in argv:
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

    parser = parser if parser is not None else make_parser()
    actions = _launch_actions()
    candidates = sorted({a.dest for a in parser._actions if a.dest != "help"} | {"accelerate_config"})
    candidates += sorted({o[2:] for o in actions})
    # Unknown keys first, before any setting's own checks can fail on a value that the unknown key was meant to set.
    if config_path is not None:
        valid = set(candidates) | {"env"}
        for key in content:
            if key not in valid:
                raise _unknown_key_error(str(key), f"in recipe '{config_path}'", candidates)
    cli_argv = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    cli_values, cli_rest = parser.parse_known_args(cli_argv)
    early_launch = _split_launch_args(cli_rest, "on the command line", False, actions, candidates)
    if config_path is not None:  # the recipe's launch keys, before the command line's (which win)
        recipe_launch = [f"--{k}={content[k]}" for k in (ACCELERATE_CONFIG_FLAG[2:], "num_processes") if k in content]
        early_launch = recipe_launch + early_launch
    # A relaunch: the batch sizes are checked for the processes that will train, not for this one.
    world_size = launch_world_size(early_launch) if early_launch else None
    backend = cli_values.ddp_backend or (content.get("ddp_backend") if config_path is not None else None)
    parse_argv = list(argv)
    if backend and "WORLD_SIZE" not in os.environ:
        # accelerate starts a process group for any `ddp_backend`, and fails without a launcher's environment: this
        # process only plans the launch (the launched ones get the setting), or trains alone.
        if not world_size or world_size < 2:
            raise RecipeError(
                f"`ddp_backend: {backend}` sets the backend of several processes, and this run has one: drop it, or "
                "launch several (`--num_processes N`, or `--accelerate_config NAME`)."
            )
        parse_argv = command_without(parse_argv, "--ddp_backend")
        parser.withheld = frozenset({"ddp_backend"})

    try:
        with assumed_world_size(world_size, LaSeRConfig) if world_size else contextlib.nullcontext():
            *dataclasses_, config_rest, cli_rest = parser.parse_args_and_config(
                parse_argv, return_remaining_strings=True, separate_remaining_strings=True
            )
    except (ValueError, TypeError) as err:  # a dataclass' own check, e.g. LaSeRConfig refusing temperature != 1
        message = " ".join(str(err).split())
        if "assign use_cpu" in message:  # transformers' advice when bf16 is on without a GPU that has it
            message = (
                "This machine has no GPU with bf16 support, and `bf16` is on (TRL's default when the recipe does not "
                "set it) or `bf16_full_eval` is: set `bf16: false` in the recipe, or pass `--bf16 false`."
            )
        raise RecipeError(message) from None
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


# ---------------------------------------------------------------------------------------------------- training
def _load_reward_funcs(names: Sequence[str]) -> list[Callable]:
    registry = _reward_registry()
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
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
                f"`reward_funcs`: unknown reward function '{name}'. Use one of {sorted(registry)} or a dotted import "
                "path (module.function)."
            )
    if not funcs:
        raise RecipeError("`reward_funcs` is empty: LaSeR needs a 0/1 verifier reward (e.g. math_verify_reward).")
    return funcs


def load_split(script_args: LaSeRScriptArguments, split: str, limit: int | None, seed: int):
    """One split as TRL's GRPOTrainer wants it: a conversational `prompt` plus the `answer` for the verifier."""
    from trl_laser.data import (
        ARITHMETIC_DATASET,
        default_instruction,
        load_problems,
        make_arithmetic_dataset,
        to_prompt_dataset,
    )

    name = script_args.dataset_name
    if not name:
        raise RecipeError(
            "`dataset_name` is not set: give a Hub dataset, a local JSON/JSONL/parquet/CSV file, or builtin:arithmetic."
        )
    if name == ARITHMETIC_DATASET:
        dataset = make_arithmetic_dataset(split, seed=seed)
    else:
        dataset = load_problems(
            name, split, script_args.problem_column, script_args.answer_column, script_args.dataset_config
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    instruction = script_args.instruction if script_args.instruction is not None else default_instruction(name)
    return to_prompt_dataset(dataset, script_args.system_prompt, instruction, script_args.instruction_separator)


def _filter_long_prompts(dataset, tokenizer, max_length: int, chat_template_kwargs: dict | None):
    """Drop the problems whose templated prompt is longer than `max_length` tokens (the paper's 2048 filter)."""

    def keep(row):
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )["input_ids"]
        return len(ids) <= max_length

    kept = dataset.filter(keep, desc=f"dropping prompts over {max_length} tokens")
    if len(kept) == 0:
        raise RecipeError(f"Every prompt is longer than `max_prompt_length={max_length}` tokens.")
    return kept


def build_trainer(script_args: LaSeRScriptArguments, training_args, model_args):
    """The `LaSeRGRPOTrainer` a recipe describes; bad input raises `RecipeError` before any training."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_laser.models import ModelNotFoundError, resolve_model_path
    from trl_laser.trainer import LaSeRGRPOTrainer

    if not model_args.model_name_or_path:
        raise RecipeError("`model_name_or_path` is not set: give a Hub id, a local directory, or an alias.")
    try:
        model_path = resolve_model_path(model_args.model_name_or_path)
        reward_funcs = _load_reward_funcs(script_args.reward_funcs)
        train_dataset = load_split(
            script_args, script_args.dataset_train_split, script_args.max_train_samples, script_args.dataset_seed
        )
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = load_split(
                script_args, script_args.dataset_test_split, script_args.max_eval_samples, script_args.dataset_seed
            )
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if script_args.max_prompt_length is not None:
            kwargs = training_args.chat_template_kwargs
            train_dataset = _filter_long_prompts(train_dataset, tokenizer, script_args.max_prompt_length, kwargs)
            if eval_dataset is not None:
                eval_dataset = _filter_long_prompts(eval_dataset, tokenizer, script_args.max_prompt_length, kwargs)

        model_init_kwargs = dict(
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype,
        )
        model_init_kwargs.update(training_args.model_init_kwargs or {})
        training_args.model_init_kwargs = model_init_kwargs
        trainer = LaSeRGRPOTrainer(
            model=model_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
        trainer.prompt_settings = prompt_settings(script_args)  # saved with the model, read back by `trl-laser eval`
        return trainer
    except RecipeError:
        raise
    except ModelNotFoundError as err:
        raise RecipeError(str(err)) from None
    except (ValueError, TypeError, OSError, ImportError) as err:  # missing column, unknown model, offline Hub, ...
        raise RecipeError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err


# ---------------------------------------------------------------------------------------------------- output dir
_RUN_FILES = ("config.json", "adapter_config.json", "trainer_state.json", RECIPE_FILE, SELF_REWARD_CONFIG_NAME)


def _checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match[1]), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def _is_complete(checkpoint: str) -> bool:
    """transformers writes a checkpoint's `trainer_state.json` last: without a readable one, it was cut off."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(output_dir: str, say: Callable[[str], None] = print) -> str:
    """The newest complete checkpoint in `output_dir`; newer ones cut off while being written are skipped, saying so."""
    checkpoints = _checkpoints(output_dir)
    for path in reversed(checkpoints):
        if _is_complete(path):
            return path
        say(f"[trl-laser] Skipping {path}: it has no complete trainer_state.json (the run stopped while writing it).")
    where = f"`output_dir` '{output_dir}'" + ("" if os.path.isdir(output_dir) else " (which does not exist)")
    raise RecipeError(
        f"`resume_from_checkpoint: true` resumes from the latest checkpoint in {where}, but it holds "
        f"{'no complete' if checkpoints else 'no'} checkpoint-N folder. Give the path of a checkpoint, the run's "
        "`output_dir`, or drop `resume_from_checkpoint` to start afresh."
    )


def check_output_dir(script_args: LaSeRScriptArguments, training_args) -> list[str]:
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
    elif resume is not None and not _is_complete(resume):
        if not os.path.isdir(resume):
            raise RecipeError(f"`resume_from_checkpoint` '{resume}': no such checkpoint folder.")
        raise RecipeError(
            f"`resume_from_checkpoint` '{resume}' has no complete trainer_state.json (the run stopped while writing "
            "it, or it is no checkpoint): give an earlier checkpoint, or `true` for the latest complete one."
        )
    training_args.resume_from_checkpoint = resume
    if resume is not None or not os.path.isdir(output_dir):
        return []
    old = _checkpoints(output_dir)
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

        from trl_laser.hub import save_recipe

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


def _hub_dataset_name(name: str | None) -> str | None:
    """The dataset to name in the model card: a Hub dataset only (not a file, not the built-in set)."""
    if not name or name.startswith("builtin:") or os.path.exists(name):
        return None
    return name


def main(script_args: LaSeRScriptArguments, training_args, model_args, recipe: str | None = None) -> None:
    """Train, save (weights, tokenizer, `self_reward_config.json`, `trainer_state.json`) and optionally push, as TRL's grpo.py does.

    `recipe` is the recipe text written next to the model (and into the model card) for reproducibility, once the
    first step has run. `output_dir` is checked first (`check_output_dir`).
    """
    from trl_laser.hub import CARD_METRICS, final_self_reward_metrics

    old_checkpoints = check_output_dir(script_args, training_args)
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.add_callback(OutputDirWriter(recipe, old_checkpoints))

    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except BaseException:  # end the progress bar's line, so that the error is reported on a line of its own
        for callback in trainer.callback_handler.callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
        raise
    trainer.accelerator.print("Training completed.")

    if trainer.accelerator.is_main_process:  # the per-step logs (curves), which TRL keeps only in checkpoints
        os.makedirs(training_args.output_dir, exist_ok=True)
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))

    # Only the main process of the main node reports what was saved: it alone writes (`accelerator.print` would
    # print on the local main process of every node).
    report = print if trainer.accelerator.is_main_process else lambda *_: None
    metrics = final_self_reward_metrics(trainer.state.log_history)
    if metrics:
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in CARD_METRICS if k in metrics)
        report(f"Final self-verification metrics (step {metrics.get('step')}): {summary}")

    if training_args.push_to_hub:  # saves into output_dir, then uploads it once, with the LaSeR model card
        trainer.push_to_hub(dataset_name=_hub_dataset_name(script_args.dataset_name))
        report(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    else:
        trainer.save_model(training_args.output_dir)
        trainer.create_model_card(dataset_name=_hub_dataset_name(script_args.dataset_name))
    report(f"Model, tokenizer, self-reward settings and model card saved to {training_args.output_dir}.")
    report(
        "Check its self-verification on problems it never saw, beside the free mean-token-log-prob baseline:\n  "
        + eval_command(script_args, training_args)
    )
    # Every process waits until the main one has written everything: a process that tore its gloo group down while
    # another still used it was aborted by the C++ runtime ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.end()


def prompt_settings(script_args: LaSeRScriptArguments):
    """How the training prompts are built (`settings.PromptSettings`), saved with the model for `trl-laser eval`."""
    from trl_laser.data import default_instruction
    from trl_laser.settings import PromptSettings

    name = script_args.dataset_name
    return PromptSettings(
        system_prompt=script_args.system_prompt,
        instruction=script_args.instruction if script_args.instruction is not None else default_instruction(name),
        instruction_separator=script_args.instruction_separator,
        dataset_name=name,
        dataset_seed=script_args.dataset_seed,
    )


def eval_command(script_args: LaSeRScriptArguments, training_args) -> str:
    """The `trl-laser eval` command that scores the saved model on the held-out split (the prompt settings of
    training are saved with the model, and eval reads them back)."""
    command = ["trl-laser", "eval", "--model", training_args.output_dir, "--dataset", str(script_args.dataset_name)]
    command += ["--split", script_args.dataset_test_split, "--num-samples", "4"]
    command += ["--max-new-tokens", str(training_args.max_completion_length)]
    if script_args.problem_column != "problem":
        command += ["--problem-column", script_args.problem_column]
    if script_args.answer_column != "answer":
        command += ["--answer-column", script_args.answer_column]
    command += ["--output-dir", os.path.normpath(training_args.output_dir) + "-eval"]  # beside the model, not in it
    return shlex.join(command)


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


def report_failure(err: BaseException, output_dir: str | None) -> int:
    """Report an error raised while training (or an interrupt) in one line, the trace only with
    `TRL_LASER_TRACEBACK=1`; return the exit status (1, or 130 for an interrupt)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
        hint = ""
    else:
        hint = f" (run with {TRACEBACK_ENV}=1 for the full traceback)"
    if isinstance(err, KeyboardInterrupt):
        done = [c for c in _checkpoints(output_dir) if _is_complete(c)] if output_dir else []
        resume = (
            f" Its latest checkpoint is {done[-1]}: continue with `--resume_from_checkpoint true`."
            if done
            else " It saved no checkpoint (`save_strategy: steps` with `save_steps` saves them)."
        )
        print(f"trl-laser train: interrupted.{resume}", file=sys.stderr, flush=True)
        return 130
    message = " ".join(str(err).split())
    print(f"trl-laser train: error: {type(err).__name__}: {message}{hint}", file=sys.stderr, flush=True)
    return 1


def prepare_model(model_args) -> None:
    """Before a relaunch: find the model once, in this one process, so that a missing one is one line here, and the
    packaged SmolLM2 is converted here rather than by every launched process at once (under ZeRO-3 their loading is
    partitioned and cannot write the float copy)."""
    from trl_laser.models import ModelNotFoundError, resolve_model_path

    if model_args.model_name_or_path:
        try:
            resolve_model_path(model_args.model_name_or_path)
        except ModelNotFoundError as err:
            raise RecipeError(str(err)) from None


def run(argv: Sequence[str]) -> int:
    """`trl-laser train ARGS`: relaunch through accelerate if asked to, else train in this process."""
    parser = make_parser()
    parsed = None
    try:
        parsed = parse_args(argv, parser)
        if parsed.launch_args:
            model_args = parsed.model_args
            relaunch(
                __file__,
                parsed.script_argv,
                parsed.launch_args,
                parsed.training_args,
                prepare=lambda: prepare_model(model_args),
            )
            return 0
        main(parsed.script_args, parsed.training_args, parsed.model_args, recipe=recipe_text(parsed))
    except (RecipeError, LaunchError) as err:
        parser.error(str(err))
    except LaunchedRunFailed as err:  # the launched run has printed its error: say which process, in one line
        print(f"trl-laser train: error: {err}", file=sys.stderr, flush=True)
        return err.returncode
    except (Exception, KeyboardInterrupt) as err:  # raised while training: one line, the trace when asked
        return report_failure(err, parsed.training_args.output_dir if parsed else None)
    return 0


def _script_main(argv: Sequence[str]) -> int:
    """Entry point under `accelerate launch` (or `python train.py`): the launch arguments were used already."""
    skip_deepspeed_shm_build()
    parser = make_parser()
    parsed = None
    try:
        parsed = parse_args(argv, parser)
        main(parsed.script_args, parsed.training_args, parsed.model_args, recipe=recipe_text(parsed))
    except RecipeError as err:
        parser.error(str(err))
    except (Exception, KeyboardInterrupt) as err:  # as `trl-laser train` reports it
        return report_failure(err, parsed.training_args.output_dir if parsed else None)
    return 0


if __name__ == "__main__":
    sys.exit(_script_main(sys.argv[1:]))
