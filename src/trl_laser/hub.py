"""What a LaSeR model takes to the Hub besides its weights: the recipe it was trained with and a model-card section.

`LaSeRGRPOTrainer.save_model` writes `self_reward_config.json` (so the pushed model can be scored with no extra
arguments) and TRL's card names LaSeR and cites arXiv 2510.14943; `LaSeRGRPOTrainer.create_model_card` (called by
checkpoints and `push_to_hub`) then adds the section built here: the self-reward settings, the final
self-verification metrics and the recipe, between markers, so that adding it twice replaces it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any


RECIPE_FILE = "laser_recipe.yaml"
CARD_START = "<!-- trl-laser:start -->"
CARD_END = "<!-- trl-laser:end -->"
ARXIV_URL = "https://arxiv.org/abs/2510.14943"

# The metrics of the card, in this order, with what they mean.
CARD_METRICS = {
    "reward": "mean verifier reward (accuracy of the sampled solutions)",
    "self_reward/accuracy": "self-verification accuracy (r_s > 0.5 vs the verifier)",
    "self_reward/f1_paper": "self-verification F1 as the paper reports it, 2 TPR TNR / (TPR + TNR)",
    "self_reward/f1": "binary F1 of 'correct' predictions",
    "self_reward/auroc": "AUROC of r_s vs correctness",
    "self_reward/ece": "expected calibration error of clamp(r_s, 0, 1)",
    "self_reward/score_correct": "mean r_s of correct solutions",
    "self_reward/score_incorrect": "mean r_s of incorrect solutions",
    "self_reward/mse": "class-balanced MSE between r_s and the verifier reward",
    "self_reward/c_ref": "c_ref, the reference constant",
}


def save_recipe(output_dir: str | os.PathLike, text: str) -> str:
    """Write the recipe a model was trained with next to it (it is uploaded with the model) and return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RECIPE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def final_self_reward_metrics(log_history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of the reward and of every `self_reward/*` metric, with the step of the last log."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        values = {k: v for k, v in entry.items() if (k == "reward" or k.startswith("self_reward/"))}
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if values:
            metrics.update(values)
            metrics["step"] = entry.get("step", metrics.get("step"))
    return metrics


def _settings_rows(settings: dict[str, Any]) -> list[str]:
    return [
        "| Setting | Value |",
        "|---|---|",
        f"| self-reward token z_c | `{settings['self_reward_token']}` (id {settings['self_reward_token_id']}) |",
        f"| beta_v (`self_reward_beta`) | {settings['self_reward_beta']} |",
        f"| c_ref (`self_reward_ref_constant`) | {settings['self_reward_ref_constant']:.4f} "
        f"({settings.get('self_reward_ref_mode', 'constant')}) |",
    ]


def laser_card_section(
    settings: dict[str, Any] | None, metrics: dict[str, float], recipe: str | None, model_id: str | None = None
) -> str:
    """The LaSeR part of a model card: how to score, the self-reward settings, final metrics and the recipe."""
    model_id = model_id or "path/to/this/model"
    lines = [
        CARD_START,
        "## LaSeR self-rewarding",
        "",
        f"Trained with [LaSeR: Reinforcement Learning with Last-Token Self-Rewarding]({ARXIV_URL}) (arXiv 2510.14943) "
        "using `trl-laser`. The model scores its own finished solution y of a problem x with one extra token:",
        "`r_s = beta_v * (log pi(z_c | x, y, EOS) - c_ref)`, read at temperature 1; a solution is predicted correct "
        "when r_s > 0.5. The settings are in `self_reward_config.json`, so scoring needs no extra arguments:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from trl_laser import generate_with_self_rewards",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        'prompts = [[{"role": "user", "content": "What is 7 plus 5?"}]]',
        "for sample in generate_with_self_rewards(model, tokenizer, prompts, num_samples=4, max_new_tokens=64)[0]:",
        "    print(sample.self_reward, sample.text)",
        "```",
        "",
    ]
    if settings:
        lines += _settings_rows(settings) + [""]
    if metrics:
        lines += [
            f"### Final self-verification metrics (training, step {metrics.get('step', '?')})",
            "",
            "| Metric | Value | Meaning |",
            "|---|---|---|",
        ]
        lines += [f"| `{k}` | {metrics[k]:.4f} | {meaning} |" for k, meaning in CARD_METRICS.items() if k in metrics]
        lines.append("")
    if recipe:
        lines += ["### Recipe", "", f"Also in `{RECIPE_FILE}`:", "", "```yaml", recipe.rstrip("\n"), "```", ""]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def add_laser_card_section(trainer: Any, output_dir: str | os.PathLike | None = None) -> str:
    """Add (or replace) the LaSeR section of `output_dir/README.md`, as written by `trainer.create_model_card`."""
    output_dir = str(output_dir if output_dir is not None else trainer.args.output_dir)
    path = os.path.join(output_dir, "README.md")
    card = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            card = f.read()
    if CARD_START in card and CARD_END in card:
        before, rest = card.split(CARD_START, 1)
        card = before.rstrip("\n") + "\n" + rest.split(CARD_END, 1)[1].lstrip("\n")
    recipe_path = os.path.join(output_dir, RECIPE_FILE)
    recipe = None
    if os.path.isfile(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            recipe = f.read()
    settings = trainer.self_reward_settings()
    section = laser_card_section(
        settings.to_dict() if settings is not None else None,
        final_self_reward_metrics(trainer.state.log_history),
        recipe,
        getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(card.rstrip("\n") + "\n\n" + section if card.strip() else section)
    return path
