"""Does z_c's row read the model it is saved with? The trained row's ranking beside least-squares fits of the same
model's EOS states, on training problems that the 64-step run never drew (the held-out split is never read).

A row-only LaSeR model without the advantage mix (`benchmarks/miniature.py`, arm `laser_row_only_no_mix`) has a
body trained by GRPO alone, so its saved row is an online linear read-out of that body's EOS states. This samples
completions of the trained model on training problems the run did not draw (the first 256 of TRL's seeded shuffle
are left out, and every repeat of their texts), reads the EOS state of each finished one, and ranks right against
wrong answers, pooled and within each problem, by: the model's own score, the mean token log-prob (free), and the
class-balanced least-squares fit of the row's update (ridge relative to the mean eigenvalue, as
`self_reward_row_ridge`), cross-validated in 5 folds grouped by problem.

    python benchmarks/row_fit_check.py --model outputs/miniature/laser_row_only_no_mix   # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json

import torch

from trl_laser import probe
from trl_laser.core import least_squares_row_step
from trl_laser.data import make_arithmetic_dataset
from trl_laser.evaluation.prompts import Prompt, resolve_prompt, saved_settings
from trl_laser.evaluation.sampling import Sampling, SelfRewardOverrides
from trl_laser.evaluation.summary import problem_groups
from trl_laser.metrics import auroc, auroc_within_group
from trl_laser.readout import grouped_folds


RIDGES = (0.01, 0.1, 1.0, 10.0)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A trained row-only model directory.")
    parser.add_argument("--problems", type=int, default=160, help="Unseen training problems sampled.")
    parser.add_argument("--drawn", type=int, default=256, help="Training problems the run drew (steps x prompts).")
    parser.add_argument("--train-seed", type=int, default=42, help="The run's seed (TRL's sampler shuffle).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling and of the folds.")
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    return parser


def unseen_problems(count: int, drawn: int, train_seed: int) -> list[dict]:
    """Training problems whose text is not among the first `drawn` of TRL's shuffle of the training split."""
    train = make_arithmetic_dataset("train", seed=0)
    generator = torch.Generator().manual_seed(train_seed)
    seen = {train[i]["problem"] for i in torch.randperm(len(train), generator=generator).tolist()[:drawn]}
    problems, texts = [], set()
    for row in train:
        if row["problem"] not in seen and row["problem"] not in texts:
            problems.append(dict(row))
            texts.add(row["problem"])
        if len(problems) == count:
            break
    return problems


def eos_states(model_dir: str, problems: list[dict], seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Sample 8 completions per problem (40 tokens, T = 1) and read each finished one's EOS state."""
    prompt, _ = resolve_prompt(saved_settings(model_dir), Prompt(), ["builtin:arithmetic"])
    sampling = Sampling(num_samples=8, max_new_tokens=40, temperature=1.0, top_p=1.0, batch_size=32, seed=seed)
    model, tokenizer, settings = probe._load(model_dir, "cpu", SelfRewardOverrides())
    conversations = [prompt.conversation(p["problem"], "builtin:arithmetic") for p in problems]
    records = probe._sample(model, tokenizer, settings, problems, conversations, prompt, sampling, False)
    finished = probe.finished_records(records, sampling.max_new_tokens, 5)
    states = probe._eos_states(model, tokenizer, settings, finished, conversations, prompt, 32, 1e-3)
    return states.double(), finished


def least_squares_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """The class-balanced least-squares row: the row update's damped step (`core.least_squares_row_step`) taken from
    a zero row, whose residuals are then `-y` (beta 1: the fit predicts y itself)."""
    coef = torch.where(y > 0.5, 0.5 / y.sum().clamp(min=1), 0.5 / (1 - y).sum().clamp(min=1))
    gram = (x * coef[:, None]).T @ x
    return least_squares_row_step(gram, -(coef * y) @ x, 1.0, ridge)


def main(args: argparse.Namespace) -> dict:
    problems = unseen_problems(args.problems, args.drawn, args.train_seed)
    states, finished = eos_states(args.model, problems, args.seed)
    labels = [bool(r["correct"]) for r in finished]
    groups = problem_groups(finished)
    y = torch.tensor(labels, dtype=torch.float64)
    folds = torch.tensor(grouped_folds(groups, 5, seed=args.seed, labels=labels))
    signals = {
        "trained score": [r["self_reward_logprob"] for r in finished],
        "mean token log-prob": [r["mean_token_logprob"] for r in finished],
    }
    for ridge in RIDGES:
        scores = torch.zeros(len(labels), dtype=torch.float64)
        for k in range(5):
            train, test = folds != k, folds == k
            scores[test] = states[test] @ least_squares_fit(states[train], y[train], ridge)
        signals[f"least squares, ridge {ridge}"] = scores.tolist()
    results = {
        "model": args.model,
        "n_problems": len(problems),
        "n_finished": len(finished),
        "n_correct": int(y.sum()),
        "signals": {
            name: {"auroc": auroc(s, labels), "auroc_within_problem": auroc_within_group(s, labels, groups)}
            for name, s in signals.items()
        },
    }
    for name, values in results["signals"].items():
        print(f"{name:28s} AUROC {values['auroc']:.3f}   within a problem {values['auroc_within_problem']:.3f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
