"""Pushing to the Hub, offline: what would be uploaded (weights, self-reward settings, recipe, LaSeR model card)."""

from __future__ import annotations

import json
import os

from conftest import SELF_REWARD_TOKEN

from trl_laser import SELF_REWARD_CONFIG_NAME, LaSeRConfig, LaSeRGRPOTrainer
from trl_laser.cli import main as cli_main
from trl_laser.data import make_arithmetic_dataset, to_prompt_dataset
from trl_laser.hub import CARD_END, CARD_START, RECIPE_FILE, add_laser_card_section
from trl_laser.rewards import math_verify_reward


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")


def tiny_trainer(model_dir, output_dir, **overrides) -> LaSeRGRPOTrainer:
    args = LaSeRConfig(
        output_dir=str(output_dir),
        self_reward_token=SELF_REWARD_TOKEN,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        **overrides,
    )
    dataset = to_prompt_dataset(
        make_arithmetic_dataset("train", num_samples=8), instruction="Answer with just the number."
    )
    return LaSeRGRPOTrainer(model=model_dir, reward_funcs=math_verify_reward, args=args, train_dataset=dataset)


def check_laser_card(card: str, repo_id: str) -> None:
    assert "LaSeR" in card and "2510.14943" in card  # TRL's card: trainer name, paper and citation
    assert card.count(CARD_START) == 1 and card.count(CARD_END) == 1
    assert "### Final self-verification metrics (training, step 1)" in card
    assert "`self_reward/c_ref`" in card and "`reward`" in card
    assert f"`{SELF_REWARD_TOKEN}`" in card
    assert f'from_pretrained("{repo_id}")' in card


def test_python_push_to_hub_as_in_trl(tiny_model_dir, tmp_path, uploads):
    trainer = tiny_trainer(tiny_model_dir, tmp_path / "out", push_to_hub=True, hub_model_id="someone/laser-tiny")
    trainer.train()
    trainer.push_to_hub()
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "someone/laser-tiny"
    files = uploads[0]["files"]
    assert "model.safetensors" in files and "tokenizer.json" in files
    settings = json.loads(files[SELF_REWARD_CONFIG_NAME])
    assert settings["self_reward_token"] == SELF_REWARD_TOKEN and settings["self_reward_ref_mode"] == "auto"
    check_laser_card(files["README.md"], "someone/laser-tiny")
    add_laser_card_section(trainer)  # a second time replaces the section
    with open(tmp_path / "out" / "README.md", encoding="utf-8") as f:
        assert f.read().count(CARD_START) == 1


def test_cli_push_to_hub(tiny_model_dir, tmp_path, uploads, capsys):
    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out)]
    argv += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--num_generations", "4"]
    argv += ["--max_completion_length", "12", "--max_steps", "1"]
    argv += ["--push_to_hub", "--hub_model_id", "someone/laser-quickstart", "--hub_token", "hf_not_a_token"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert len(uploads) == 1  # one upload at the end, not one per save
    # The recipe trains the row alone: the printed refit pushes the fitted model to the same repository.
    assert f"--output-dir {out}-fit --push-to-hub --hub-model-id someone/laser-quickstart" in printed
    call = uploads[0]
    assert call["repo_id"] == "someone/laser-quickstart" and call["commit_message"] == "End of training"
    files = call["files"]
    assert {SELF_REWARD_CONFIG_NAME, RECIPE_FILE, "README.md", "model.safetensors", "tokenizer.json"} <= set(files)
    card = files["README.md"]
    check_laser_card(card, "someone/laser-quickstart")
    assert "### Recipe" in card and "self_reward_token: <gh_stars>" in card
    assert "hf_not_a_token" not in card and "hf_not_a_token" not in files[RECIPE_FILE]
    assert "builtin:arithmetic" not in card.split("---")[1]  # not a Hub dataset: not in the card's metadata


def test_cli_push_to_hub_with_the_refit_after_training(tiny_model_dir, tmp_path, uploads, capsys):
    from trl_laser.hub import ROW_FIT_FILE, ROW_FIT_START

    out = tmp_path / "out"
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out)]
    argv += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--num_generations", "4"]
    argv += ["--max_completion_length", "12", "--max_steps", "1", "--fit_row_problems", "5"]
    argv += ["--push_to_hub", "--hub_model_id", "someone/laser-quickstart", "--hub_private_repo", "true"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    # The trained model first, then the fitted one over it, in the same repository.
    assert [call["repo_id"] for call in uploads] == ["someone/laser-quickstart"] * 2
    trained, fitted = (call["files"] for call in uploads)
    assert ROW_FIT_FILE not in trained and ROW_FIT_START not in trained["README.md"]
    assert ROW_FIT_FILE in fitted and fitted["README.md"].count(ROW_FIT_START) == 1
    assert 'from_pretrained("someone/laser-quickstart")' in fitted["README.md"]
    assert uploads[1]["commit_message"] == "trl-laser fit-row: z_c's row refitted"
    assert uploads.created[-1]["private"] is True
    assert (
        "Model with the refitted row pushed to the Hub in https://huggingface.co/someone/laser-quickstart." in printed
    )
