"""The training side of the paper's protocol inside the trainer: A_s scaled as TRL scales A_v, the completions
table's advantage is the one trained on, and alpha weighs the MSE per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EOS, EOS2, FINISHED, FIXED, SELF_REWARD_TOKEN, ZC, force_completions
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.trainer.utils import split_tensor_dict

from trl_laser import LaSeRConfig, LaSeRGRPOTrainer


BETA_V, C_REF, TAU, ALPHA = 0.1, -12.0, 0.3, 0.1


def parity_reward(completion_ids, **kwargs):
    """0/1 'verifier': an even completion length is 'correct' (FIXED gives groups [0, 1, 1, 1] and [1, 0, 1, 0])."""
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def make_trainer(model_dir, tmp_path, **overrides) -> LaSeRGRPOTrainer:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        self_reward_token=SELF_REWARD_TOKEN,
        self_reward_ref_constant=C_REF,
        self_reward_beta=BETA_V,
        self_reward_loss_coef=ALPHA,
        self_reward_advantage_coef=TAU,
        self_reward_std_threshold=0.0,
    )
    kwargs.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = [EOS, EOS2]  # FIXED's row 4 ends with the second EOS id
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}] * 8)
    trainer = LaSeRGRPOTrainer(
        model=model, reward_funcs=[parity_reward], args=LaSeRConfig(**kwargs), train_dataset=dataset
    )
    force_completions(trainer)
    trainer.model.train()
    return trainer


def generation_batch() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"What is {i // 4} + {i // 4}?"}], "answer": "0"} for i in range(8)
    ]


def hand_scores(trainer, batch) -> list[torch.Tensor]:
    """r_s of each finished row from a plain full-logits forward of x, y (ending with EOS); None for truncated rows."""
    scores = []
    for row in range(8):
        if not FINISHED[row]:
            scores.append(None)
            continue
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        ids = torch.cat([prompt, torch.tensor(FIXED[row])])[None]
        logits = trainer.model(input_ids=ids).logits[0, -1]
        scores.append(BETA_V * (torch.log_softmax(logits, -1)[ZC] - C_REF))
    return scores


def _mean(values):
    return sum(values) / len(values)


def _std(values):
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize(
    "scale_rewards, aggregation",
    [("batch", "sum_then_normalize"), ("none", "sum_then_normalize"), ("group", "normalize_then_sum")],
)
def test_mix_scales_a_s_as_trl_scales_a_v_and_the_table_shows_it(tiny_model_dir, tmp_path, scale_rewards, aggregation):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, scale_rewards=scale_rewards, multi_objective_aggregation=aggregation
    )
    batch = trainer._generate_and_score_completions(generation_batch())

    # TRL's A_v for the one reward function, written out (with TRL's 1e-4).
    r = parity_reward(FIXED)
    groups = [r[:4], r[4:]]
    if aggregation == "normalize_then_sum":
        z = [(v - _mean(g)) / (_std(g) + 1e-4) for g in groups for v in g]
        a_v = [(v - _mean(z)) / (_std(z) + 1e-4) for v in z]
    elif scale_rewards == "batch":
        a_v = [(v - _mean(g)) / (_std(r) + 1e-4) for g in groups for v in g]
    else:
        a_v = [v - _mean(g) for g in groups for v in g]
    # A_s: the same formulas for s = clamp(r_s, 0, 1) (truncated: 0), without the 1e-4.
    with torch.no_grad():
        s = [0.0 if x is None else min(max(x.item(), 0.0), 1.0) for x in hand_scores(trainer, batch)]
    s_groups = [s[:4], s[4:]]
    assert all(_std(g) > 0 for g in s_groups)  # no group is filtered at threshold 0
    if aggregation == "normalize_then_sum":
        z = [(v - _mean(g)) / _std(g) for g in s_groups for v in g]
        a_s = [(v - _mean(z)) / _std(z) for v in z]
    elif scale_rewards == "batch":
        a_s = [(v - _mean(g)) / _std(s) for g in s_groups for v in g]
    else:
        a_s = [v - _mean(g) for g in s_groups for v in g]
    expected = torch.tensor([(1 - TAU) * v + TAU * w for v, w in zip(a_v, a_s)])

    assert torch.allclose(batch["advantages"], expected, atol=1e-4)
    # The completions table / wandb column: the advantage trained on, not TRL's A_v.
    assert torch.allclose(torch.tensor(list(trainer._logs["advantages"])), expected, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, per_step",
    [
        # a generation batch spans 2 optimizer steps: each step's half of the rows counts twice
        ({"per_device_train_batch_size": 4, "steps_per_generation": 2, "gradient_accumulation_steps": 1}, 2.0),
        # an optimizer step spans 2 generation batches: each counts half (alpha times their mean l_MSE)
        ({"per_device_train_batch_size": 8, "steps_per_generation": 1, "gradient_accumulation_steps": 2}, 0.5),
    ],
    ids=["generation_spans_two_steps", "step_spans_two_generations"],
)
def test_alpha_weighs_the_mse_per_optimizer_step(tiny_model_dir, tmp_path, overrides, per_step):
    trainer = make_trainer(tiny_model_dir, tmp_path, self_reward_advantage_coef=0.0, **overrides)
    trainer.current_gradient_accumulation_steps = overrides["gradient_accumulation_steps"]
    batch = trainer._generate_and_score_completions(generation_batch())
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # isolate the LaSeR term: no policy gradient
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    # Hand computation: alpha * l_MSE of the generation batch, class-balanced, from full-logits forwards.
    trainer.model.zero_grad()
    r = parity_reward(FIXED)
    done = [row for row in range(8) if FINISHED[row]]
    n_c = sum(r[row] for row in done)
    n_i = len(done) - n_c
    scores = hand_scores(trainer, batch)
    total = sum(
        (len(done) / (2 * n_c) if r[row] else len(done) / (2 * n_i)) * (scores[row] - r[row]) ** 2 for row in done
    )
    (ALPHA * total / len(done)).backward()
    reference = [p.grad.clone() for p in params]

    trainer.model.zero_grad()
    for chunk in split_tensor_dict(batch, 8 // overrides["per_device_train_batch_size"]):
        trainer._compute_loss(trainer.model, chunk).backward()
    for grad, ref in zip((p.grad for p in params), reference):
        assert torch.allclose(grad, per_step * ref, atol=1e-6, rtol=1e-4)
    assert any(ref.abs().sum() > 0 for ref in reference)
