"""`trl-laser train`: LaSeR (or its GRPO baseline) from a recipe, the way `trl grpo` trains GRPO.

    trl-laser train --config recipes/quickstart/laser/config_smollm2_arithmetic.yaml [--key value ...]
    trl-laser train --config recipes/Qwen2.5-7B/laser/config_deepmath.yaml --accelerate_config zero3

The recipe (YAML) gives defaults and the command line wins, over three dataclasses: `LaSeRScriptArguments` (data and
rewards), `LaSeRConfig` (training, LaSeR included) and TRL's `ModelConfig`. Unlike TRL and open-r1, a key that none
of them has is an error naming the nearest valid key, so that a renamed or mistyped setting is never silently lost.
Keys of `accelerate launch` (`--num_processes`, `--machine_rank`, ...) and `--accelerate_config NAME|PATH` relaunch this
script through `accelerate launch`; `ddp`, `zero2`, `zero3` and `zero3_multinode` name the configs shipped in
`recipes/accelerate_configs/` (and inside the package).
"""

import argparse
import difflib
import importlib
import importlib.resources
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


ACCELERATE_CONFIG_DIR = Path("recipes") / "accelerate_configs"
_ACCELERATE_CONFIG_FLAG = "--accelerate_config"
_SECRET_KEYS = ("hub_token",)
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
            "help": "Reward functions, the first being LaSeR's 0/1 verifier: `math_verify_reward` (default), or "
            "dotted import paths such as `my_lib.rewards.my_reward`."
        },
    )


class RecipeError(ValueError):
    """Bad input in a recipe or on the command line: reported in one line, without a stack trace."""


def _reward_registry() -> dict[str, Callable]:
    from trl_laser.answers import math_verify_reward

    return {"math_verify_reward": math_verify_reward}


def make_parser(prog: str | None = None):
    """The `TrlParser` over `LaSeRScriptArguments`, `LaSeRConfig` and `ModelConfig`; abbreviated keys are refused."""
    from trl import ModelConfig, TrlParser

    from trl_laser.config import LaSeRConfig

    return TrlParser(
        (LaSeRScriptArguments, LaSeRConfig, ModelConfig),
        prog=prog or "trl-laser train",
        usage=USAGE,
        allow_abbrev=False,
    )


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
        if option == _ACCELERATE_CONFIG_FLAG or (action is not None and action.nargs != 0):
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
    _, cli_rest = parser.parse_known_args(cli_argv)
    _split_launch_args(cli_rest, "on the command line", False, actions, candidates)

    try:
        *dataclasses_, config_rest, cli_rest = parser.parse_args_and_config(
            list(argv), return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as err:  # a dataclass' own check, e.g. LaSeRConfig refusing temperature != 1
        raise RecipeError(" ".join(str(err).split())) from None
    script_args, training_args, model_args = dataclasses_
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


# ---------------------------------------------------------------------------------------------------- launching
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
    raise RecipeError(
        f"Accelerate config '{name_or_path}' is neither a file nor one of the shipped configs "
        f"{sorted(packaged)}: give a path or one of those names."
    )


def _accelerate_launch_args(launch_args: list[str]) -> list[str]:
    """`--accelerate_config X` becomes `--config_file <file>`, checked for what its distributed type needs."""
    import yaml

    args = list(launch_args)
    for i, arg in enumerate(args):
        if arg.startswith(_ACCELERATE_CONFIG_FLAG + "="):
            args[i : i + 1] = [_ACCELERATE_CONFIG_FLAG, arg.split("=", 1)[1]]
            break
    if _ACCELERATE_CONFIG_FLAG not in args:
        return args
    index = args.index(_ACCELERATE_CONFIG_FLAG)
    path = resolve_accelerate_config(args[index + 1])
    with open(path, encoding="utf-8") as f:
        distributed = (yaml.safe_load(f) or {}).get("distributed_type")
    if distributed == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            f"Accelerate config '{path}' uses DeepSpeed, which is not installed: `pip install "
            '"trl-laser[deepspeed]"`, or use `--accelerate_config ddp`.'
        )
    return ["--config_file", str(path)] + args[:index] + args[index + 2 :]


def relaunch(script_argv: list[str], launch_args: list[str]) -> None:
    """Run this script under `accelerate launch`, with the launch arguments first and the recipe arguments after."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    command = _accelerate_launch_args(launch_args) + [str(Path(__file__).resolve())] + script_argv
    print(f"[trl-laser] accelerate launch {shlex.join(command)}", flush=True)
    launch_command(launch_command_parser().parse_args(command))


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
    return to_prompt_dataset(dataset, script_args.system_prompt, instruction)


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

    from trl_laser.models import resolve_model_path
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
        return LaSeRGRPOTrainer(
            model=model_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    except RecipeError:
        raise
    except (ValueError, TypeError, OSError, ImportError) as err:  # missing column, unknown model, offline Hub, ...
        raise RecipeError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err


def _hub_dataset_name(name: str | None) -> str | None:
    """The dataset to name in the model card: a Hub dataset only (not a file, not the built-in set)."""
    if not name or name.startswith("builtin:") or os.path.exists(name):
        return None
    return name


def main(script_args: LaSeRScriptArguments, training_args, model_args, recipe: str | None = None) -> None:
    """Train, save (weights, tokenizer, `self_reward_config.json`, `trainer_state.json`) and optionally push, as TRL's grpo.py does.

    `recipe` is the recipe text written next to the model (and into the model card) for reproducibility.
    """
    from trl_laser.hub import CARD_METRICS, final_self_reward_metrics, save_recipe

    trainer = build_trainer(script_args, training_args, model_args)
    if recipe is not None and trainer.accelerator.is_main_process:
        save_recipe(training_args.output_dir, recipe)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    if trainer.accelerator.is_main_process:  # the per-step logs (curves), which TRL keeps only in checkpoints
        os.makedirs(training_args.output_dir, exist_ok=True)
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))

    metrics = final_self_reward_metrics(trainer.state.log_history)
    if metrics:
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in CARD_METRICS if k in metrics)
        trainer.accelerator.print(f"Final self-verification metrics (step {metrics.get('step')}): {summary}")

    if training_args.push_to_hub:  # saves into output_dir, then uploads it once, with the LaSeR model card
        trainer.push_to_hub(dataset_name=_hub_dataset_name(script_args.dataset_name))
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    else:
        trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model, tokenizer and self-reward settings saved to {training_args.output_dir}.")
    trainer.accelerator.print(
        "Check its self-verification on problems it never saw, beside the free mean-token-log-prob baseline:\n  "
        + eval_command(script_args, training_args)
    )
    trainer.end()


def eval_command(script_args: LaSeRScriptArguments, training_args) -> str:
    """The `trl-laser eval` command that scores the saved model on the held-out split, with the training prompt."""
    from trl_laser.data import default_instruction

    command = ["trl-laser", "eval", "--model", training_args.output_dir, "--dataset", str(script_args.dataset_name)]
    command += ["--split", script_args.dataset_test_split, "--num-samples", "4"]
    command += ["--max-new-tokens", str(training_args.max_completion_length)]
    if script_args.instruction is not None and script_args.instruction != default_instruction(
        script_args.dataset_name
    ):
        command += ["--instruction", script_args.instruction]
    if script_args.system_prompt is not None:
        command += ["--system-prompt", script_args.system_prompt]
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


def run(argv: Sequence[str]) -> int:
    """`trl-laser train ARGS`: relaunch through accelerate if asked to, else train in this process."""
    parser = make_parser()
    try:
        parsed = parse_args(argv, parser)
        if parsed.launch_args:
            relaunch(parsed.script_argv, parsed.launch_args)
            return 0
        main(parsed.script_args, parsed.training_args, parsed.model_args, recipe=recipe_text(parsed))
    except RecipeError as err:
        parser.error(str(err))
    except subprocess.CalledProcessError as err:  # the relaunched run failed and has printed why
        return err.returncode
    return 0


def _script_main(argv: Sequence[str]) -> None:
    """Entry point under `accelerate launch` (or `python train.py`): the launch arguments were used already."""
    parser = make_parser()
    try:
        parsed = parse_args(argv, parser)
        main(parsed.script_args, parsed.training_args, parsed.model_args, recipe=recipe_text(parsed))
    except RecipeError as err:
        parser.error(str(err))


if __name__ == "__main__":
    _script_main(sys.argv[1:])
