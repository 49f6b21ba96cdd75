"""`trl-laser train` and a new user's mistakes: each gets one line naming the setting, nothing that existed is lost.

Interruption tests kill real `trl-laser train` processes (SIGKILL, SIGINT) once a checkpoint exists, then resume
them with `--resume_from_checkpoint true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
import yaml

from trl_laser.cli import main as cli_main
from trl_laser.config import LaSeRConfig
from trl_laser.hub import RECIPE_FILE
from trl_laser.recipe import Mismatch, RecipeError, conform
from trl_laser.run_dir import checkpoints, is_complete, latest_checkpoint
from trl_laser.scripts import train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")
# The quickstart on the tiny model of conftest: 2 prompts x 4 completions of at most 12 tokens per step.
SHORT = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--num_generations", "4"]
SHORT += ["--max_completion_length", "12", "--self_reward_warmup_steps", "1"]
SAVE_EVERY_STEP = ["--save_strategy", "steps", "--save_steps", "1"]
TRAIN_ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def write_recipe(tmp_path, drop: tuple[str, ...] = (), **overrides) -> str:
    with open(QUICKSTART, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    recipe.update(overrides)
    for key in drop:
        del recipe[key]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def train_cli(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of `trl-laser train ARGV` run in this process."""
    try:
        code = cli_main(["train", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def folder_digest(path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256): equal digests mean nothing was changed, added or lost."""
    digest = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("trl-laser train: error:")]


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path) -> str:
    """An output dir as a finished run leaves it: the model, its recipe, a checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out)
    (out / RECIPE_FILE).write_text("# trl-laser train --config old.yaml\n")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return str(out)


# ---------------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_steps", 2.5, "must be an integer, got 2.5."),
        ("num_generations", 4.0, "must be an integer or null, got 4.0."),
        ("reward_funcs", "math_verify_reward", "must be a list of strings, got 'math_verify_reward'."),
        ("self_reward_beta", [0.1], "must be a number, got [0.1]."),
    ],
)
def test_recipe_types_are_checked_before_the_model_loads(tmp_path, capsys, key, value, expected):
    # The model does not exist: an error about it would mean that the type was checked too late.
    path = write_recipe(tmp_path, **{key: value}, model_name_or_path=str(tmp_path / "no_model"))
    code, err = train_cli(["--config", path, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert line.startswith(f"trl-laser train: error: Recipe key `{key}` {expected}")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_reward_funcs_as_a_string_says_how_to_write_the_list(tmp_path, capsys):
    code, err = train_cli(["--config", write_recipe(tmp_path, reward_funcs="math_verify_reward")], capsys)
    assert code == 2 and "Write a YAML list: `reward_funcs: [math_verify_reward]`." in err


def test_recipe_values_are_read_as_the_command_line_reads_them():
    # YAML reads 1e-5 (no dot) as a string, -23.0 for a string field as a float: both as their command-line text.
    assert conform("1e-5", float) == 1e-5
    assert conform("3", int) == 3 and conform(-23.0, str) == "-23.0"
    assert conform("yes", bool) is True and conform("0", bool | None) is False
    assert conform(False, str | None | typing.Literal[False]) is False
    assert conform([1, "0.5"], list[float] | None) == [1, 0.5]
    for value, tp in [(4.0, int), (True, int), ("2.5", int), ("x", float), ({"a": 1}, str), ("a", list[str])]:
        with pytest.raises(Mismatch):
            conform(value, tp)


def test_recipe_choices_are_checked(tmp_path, capsys):
    code, err = train_cli(["--config", write_recipe(tmp_path, self_reward_row_update="rls")], capsys)
    assert code == 2
    assert "Recipe key `self_reward_row_update` must be one of ['optimizer', 'least_squares'], got 'rls'." in err


# ---------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max_steps", "-5"], "`max_steps` must be an integer > 0, or -1 to train for `num_train_epochs`, got -5."),
        (["--max_steps", "0"], "`max_steps` must be an integer > 0, or -1"),
        (["--num_generations", "0"], "`num_generations` must be an integer >= 2, got 0."),
    ],
)
def test_step_counts_that_would_train_silently_or_divide_by_zero(tmp_path, capsys, argv, expected):
    code, err = train_cli(["--config", QUICKSTART, "--output_dir", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and expected in err and "Traceback" not in err and "ZeroDivisionError" not in err


def test_step_counts_are_checked_in_a_notebook_too(tmp_path):
    common = dict(output_dir=str(tmp_path), self_reward_token="<gh_stars>", bf16=False, report_to="none")
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer > 0, or -1 .* got -5"):
        LaSeRConfig(max_steps=-5, **common)
    with pytest.raises(ValueError, match="`num_generations` must be an integer >= 2, got 0"):
        LaSeRConfig(num_generations=0, **common)
    assert LaSeRConfig(max_steps=-1, **common).max_steps == -1


# ---------------------------------------------------------------------------------------------------- output dir
def test_new_run_into_a_finished_run_is_refused_and_changes_nothing(finished_run, capsys):
    before = folder_digest(finished_run)
    code, err = train_cli(
        ["--config", QUICKSTART, "--model_name_or_path", finished_run, "--output_dir", finished_run], capsys
    )
    assert code == 2
    [line] = error_lines(err)
    assert (
        f"`output_dir` '{finished_run}' already holds a run (checkpoint-2, config.json, laser_recipe.yaml, model.safetensors):"
        in line
    )
    assert "`--resume_from_checkpoint true`" in line and "`--overwrite_output_dir true`" in line
    assert "Traceback" not in err and folder_digest(finished_run) == before


def test_run_failing_at_its_first_step_leaves_the_folder_byte_identical(
    finished_run, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    # Overwriting is asked for, but the verifier is broken (returns 2): LaSeR stops at the first batch, and
    # neither the recipe nor the old checkpoints of the finished run have been touched.
    (tmp_path / "broken_reward.py").write_text(
        "def two(completions, **kwargs):\n    return [2.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = folder_digest(finished_run)
    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", finished_run, *SHORT]
    code, err = train_cli([*argv, "--reward_funcs", "broken_reward.two", "--overwrite_output_dir", "true"], capsys)
    assert code == 1
    [line] = error_lines(err)
    assert line.startswith("trl-laser train: error: ValueError: The verifier reward function 'two' returned 2.0")
    assert "`self_reward_verifier`" in line and line.endswith(
        "(run with TRL_LASER_TRACEBACK=1 for the full traceback)"
    )
    assert "Traceback" not in err
    assert folder_digest(finished_run) == before


def test_errors_raised_while_training_are_one_line_and_the_trace_on_request(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("c_ref is missing\nfrom the checkpoint")

    monkeypatch.setattr(train, "main", fail)
    argv = ["--config", QUICKSTART, "--output_dir", str(tmp_path)]
    assert cli_main(["train", *argv]) == 1
    err = capsys.readouterr().err
    hint = " (run with TRL_LASER_TRACEBACK=1 for the full traceback)"
    assert err == f"trl-laser train: error: RuntimeError: c_ref is missing from the checkpoint{hint}\n"
    assert train.run(argv, launched=True) == 1  # the processes that `accelerate launch` starts
    assert capsys.readouterr().err == err
    monkeypatch.setenv("TRL_LASER_TRACEBACK", "1")
    assert cli_main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in fail" in err
    assert err.endswith("trl-laser train: error: RuntimeError: c_ref is missing from the checkpoint\n")


# ---------------------------------------------------------------------------------------------------- resuming
def test_resume_true_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "never_trained"
    code, err = train_cli(
        ["--config", QUICKSTART, "--output_dir", str(missing), "--resume_from_checkpoint", "true"], capsys
    )
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "`resume_from_checkpoint: true` resumes from the latest checkpoint in `output_dir`" in line
    assert "(which does not exist), but it holds no checkpoint-N folder" in line
    assert not missing.exists()


def write_checkpoint_states(folder) -> None:
    """Stand-ins for the weights, optimizer, scheduler and RNG state that a complete checkpoint holds besides its
    trainer_state.json (`run_dir.checkpoint_problem`)."""
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / name)


def test_latest_checkpoint_skips_checkpoints_cut_off_while_written(tmp_path):
    for step, state in [(2, '{"global_step": 2}'), (10, '{"global_step": 10}'), (11, '{"global_st'), (12, None)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_checkpoint_states(tmp_path / f"checkpoint-{step}")
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint name
    said = []
    assert latest_checkpoint(str(tmp_path), say=said.append) == str(tmp_path / "checkpoint-10")
    assert [line.split(":")[0] for line in said] == [
        f"[trl-laser] Skipping {tmp_path / 'checkpoint-12'}",
        f"[trl-laser] Skipping {tmp_path / 'checkpoint-11'}",
    ]
    for step in (2, 10):
        shutil.rmtree(tmp_path / f"checkpoint-{step}")
    with pytest.raises(RecipeError, match="but it holds no complete checkpoint-N folder"):
        latest_checkpoint(str(tmp_path), say=said.append)


# ---------------------------------------------------------------------------------------------------- machine, model
@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 advice is for machines without a GPU")
def test_cpu_machine_and_a_recipe_without_bf16_false(tmp_path, capsys):
    code, err = train_cli(["--config", write_recipe(tmp_path, drop=("bf16",))], capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "no GPU with bf16 support" in line and "set `bf16: false` in the recipe, or pass `--bf16 false`" in line
    assert "use_cpu" not in line


def test_missing_model_folder_or_hub_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--config", QUICKSTART, "--output_dir", str(tmp_path / "out")]
    missing = str(tmp_path / "models" / "my-model")
    code, err = train_cli([*argv, "--model_name_or_path", missing], capsys)
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [
        f"trl-laser train: error: `model_name_or_path` '{missing}': no such folder or Hub model."
    ]
    code, err = train_cli([*argv, "--model_name_or_path", "nobody/no-such-model"], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "`model_name_or_path` 'nobody/no-such-model': no such folder, and no Hub model of that name" in line
    assert "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- interruptions
@contextlib.contextmanager
def training_process(argv, stderr_path):
    """`trl-laser train ARGV` in its own process group, killed with its group when the block ends."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "trl_laser", "train", *argv],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=TRAIN_ENV,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_checkpoint(process, out, stderr_path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(is_complete(c) for c in checkpoints(str(out))):
        assert process.poll() is None, open(stderr_path).read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)


def completed_steps(out) -> int:
    return int(latest_checkpoint(str(out), say=lambda _: None).rsplit("-", 1)[1])


def test_sigkill_then_resume_true_continues_from_the_latest_complete_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]
    with training_process([*argv, *SAVE_EVERY_STEP, "--max_steps", "50"], tmp_path / "stderr.txt") as process:
        wait_for_checkpoint(process, out, tmp_path / "stderr.txt")
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    steps = completed_steps(out)
    # A checkpoint killed while being written: everything but trainer_state.json, which transformers writes last.
    cut = out / f"checkpoint-{steps + 40}"
    shutil.copytree(out / f"checkpoint-{steps}", cut, ignore=shutil.ignore_patterns("trainer_state.json"))

    resume = [*argv, *SAVE_EVERY_STEP, "--max_steps", str(steps + 1), "--resume_from_checkpoint", "true"]
    assert cli_main(["train", *resume]) == 0
    printed = capsys.readouterr().out
    assert f"[trl-laser] Skipping {cut}: it has no complete trainer_state.json" in printed
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps + 1
    assert [e["step"] for e in state["log_history"] if "self_reward/mse" in e] == list(range(1, steps + 2))
    assert "--resume_from_checkpoint true" in (out / RECIPE_FILE).read_text()


def test_sigint_prints_one_line_that_says_how_to_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]
    with training_process([*argv, *SAVE_EVERY_STEP, "--max_steps", "50"], tmp_path / "stderr.txt") as process:
        wait_for_checkpoint(process, out, tmp_path / "stderr.txt")
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("trl-laser train: interrupted.")]
    latest = latest_checkpoint(str(out), say=lambda _: None)
    assert line == (
        f"trl-laser train: interrupted. Its latest checkpoint is {latest}: continue with "
        "`--resume_from_checkpoint true`."
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_model_dir, tmp_path, sig):
    from safetensors.torch import load_file

    steps = 6

    def argv(out):
        return ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = [*SAVE_EVERY_STEP, "--max_steps", str(steps)]
    subprocess.run(
        [sys.executable, "-m", "trl_laser", "train", *argv(whole), *common], env=TRAIN_ENV, cwd=ROOT, check=True
    )
    with training_process([*argv(cut), *common], tmp_path / "stderr.txt") as process:
        wait_for_checkpoint(process, cut, tmp_path / "stderr.txt")
        os.killpg(process.pid, sig)
        process.wait(timeout=120)
    assert completed_steps(cut) < steps
    resume = [*argv(cut), *common, "--resume_from_checkpoint", "true"]
    subprocess.run([sys.executable, "-m", "trl_laser", "train", *resume], env=TRAIN_ENV, cwd=ROOT, check=True)
    expected, got = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
