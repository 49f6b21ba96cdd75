"""What a LaSeR model takes to the Hub besides its weights: the recipe it was trained with and a model-card section.

`LaSeRGRPOTrainer.save_model` writes `self_reward_config.json` (so the pushed model can be scored with no extra
arguments) and TRL's card names LaSeR and cites arXiv 2510.14943; `LaSeRGRPOTrainer.create_model_card` (called by
checkpoints and `push_to_hub`) then adds the section built here: the self-reward settings, the final
self-verification metrics and the recipe, between markers, so that adding it twice replaces it. `trl-laser fit-row`
adds a second section on the refitted row to the copied card, and pushes the folder like `Trainer.push_to_hub`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .settings import SELF_REWARD_CONFIG_NAME


RECIPE_FILE = "laser_recipe.yaml"
CARD_START = "<!-- trl-laser:start -->"
CARD_END = "<!-- trl-laser:end -->"
ROW_FIT_START = "<!-- trl-laser-fit-row:start -->"
ROW_FIT_END = "<!-- trl-laser-fit-row:end -->"
ROW_FIT_FILE = "row_fit.json"  # what `trl_laser.row_fit.fit_row` chose and measured, beside the fitted model
# The fitting-sample signals of `fit_row`'s result, as the card names them.
ROW_FIT_SIGNALS = {
    "self_reward_before": "LaSeR score before the fit",
    "self_reward_after": "LaSeR score after the fit (in-sample)",
    "mean_token_logprob": "mean token log-prob (free)",
    "min_token_logprob": "min token log-prob (free)",
    "answer_agreement": "answer agreement (free)",
}
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
    settings = trainer.self_reward_settings()
    return write_laser_card(
        output_dir if output_dir is not None else trainer.args.output_dir,
        settings.to_dict() if settings is not None else None,
        trainer.state.log_history,
        getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
    )


def write_laser_card(
    output_dir: str | os.PathLike,
    settings: dict[str, Any] | None,
    log_history: Sequence[dict[str, Any]],
    model_id: str | None,
    row_fit: dict[str, Any] | None = None,
) -> str:
    """Add (or replace) the LaSeR section of `output_dir/README.md` (the recipe is read from the folder), and the
    row-fit section when `row_fit` (`trl_laser.row_fit.fit_row`'s result) is given; return the card's path."""
    output_dir = str(output_dir)
    path = os.path.join(output_dir, "README.md")
    card = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            card = f.read()
    recipe_path = os.path.join(output_dir, RECIPE_FILE)
    recipe = None
    if os.path.isfile(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            recipe = f.read()
    card = _replace_section(
        card,
        CARD_START,
        CARD_END,
        laser_card_section(settings, final_self_reward_metrics(log_history), recipe, model_id),
    )
    if row_fit is not None:
        card = _replace_section(card, ROW_FIT_START, ROW_FIT_END, row_fit_card_section(row_fit))
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


def _replace_section(card: str, start: str, end: str, section: str) -> str:
    """`card` with the text between `start` and `end` (markers included) replaced by `section`, or `section` added."""
    if start in card and end in card:
        before, rest = card.split(start, 1)
        card = before.rstrip("\n") + "\n" + rest.split(end, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section if card.strip() else section


def row_fit_card_section(result: dict[str, Any]) -> str:
    """What `trl-laser fit-row` changed, for the card: the fitting samples, the cross-validated choice, and how the
    score and the fitting-sample signals rank answers before and after."""
    chosen, cv = result["chosen"], result["cross_validation"]
    lines = [
        ROW_FIT_START,
        "## z_c's row refitted after training (`trl-laser fit-row`)",
        "",
        f"After training, z_c's output row was fitted in closed form to LaSeR's class-balanced MSE on this model's own "
        f"answers: {result['n_finished']} finished samples ({result['n_correct_finished']} correct) of "
        f"{result['n_problems']} problems of `{result['dataset']}` ({result['split']} split). The ridge "
        f"({chosen['ridge']:g}) and the weight of the fit between problems ({chosen['between_weight']:g}) were chosen "
        f"by {cv['folds']}-fold cross-validation grouped by problem: out-of-fold AUROC {_cell(chosen['auroc'])}, "
        f"{_cell(chosen['auroc_within_problem'])} within a problem. The score keeps its definition, beta_v and c_ref.",
        "",
        "`generation_config.json` suppresses z_c (`suppress_tokens`), so `generate` samples answers exactly as before "
        "the fit; the score reads the raw logits after the EOS. Other samplers must suppress it too (vLLM: "
        "`SamplingParams(logit_bias={z_c: -100})`, which `trl-laser eval --backend vllm` sets). Details in "
        f"`{ROW_FIT_FILE}`.",
        "",
        "| Signal on the fitting samples | AUROC | AUROC within a problem |",
        "|---|---|---|",
    ]
    for name, rank in result["fitting_samples"].items():
        label = ROW_FIT_SIGNALS.get(name, f"`{name}`")
        lines.append(f"| {label} | {_cell(rank['auroc'])} | {_cell(rank['auroc_within_problem'])} |")
    return "\n".join([*lines, "", ROW_FIT_END]) + "\n"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_row_fit_card(output_dir: str | os.PathLike, model_id: str | None = None) -> str:
    """The card of a folder that `trl_laser.row_fit.fit_row` wrote, from its files alone: the LaSeR section (settings,
    the training run's final metrics and recipe, copied from the trained model) and the row-fit section."""
    settings = _read_json(output_dir, SELF_REWARD_CONFIG_NAME)
    state = _read_json(output_dir, "trainer_state.json") or {}
    row_fit = _read_json(output_dir, ROW_FIT_FILE)
    return write_laser_card(output_dir, settings, state.get("log_history", []), model_id, row_fit)


def push_row_fit(
    output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None
) -> str:
    """Upload a folder that `fit_row` wrote to the Hub repository `repo_id` (created if needed), its card naming the
    repository, as `Trainer.push_to_hub` uploads a trained model; return the full repository id. A failed upload is
    an `OSError` that says the model is kept and gives the command that uploads it later."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        write_row_fit_card(output_dir, full_id)
        api.upload_folder(
            repo_id=full_id,
            folder_path=str(output_dir),
            commit_message="trl-laser fit-row: z_c's row refitted",
            ignore_patterns=["_*", "checkpoint-*"],
        )
    except OSError as err:  # offline, no token, no rights: the Hub's own errors are OSErrors
        raise OSError(
            f"{' '.join(str(err).split())} The fitted model is saved in {output_dir}: upload it with "
            f"`hf upload {repo_id} {output_dir}` once the Hub is reachable."
        ) from err
    return full_id


def _read_json(folder: str | os.PathLike, name: str) -> Any:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
