"""The levers that act within a group (one prompt's completions): per-group class weights, the pair loss, the
within-group fit of z_c's row and the MSE's between-group part weighted down in the model's gradient, each against a
hand computation, then in the trainer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import ZC, force_completions
from test_row_update import LEVERS, LS, Snapshots, capture_batches
from test_trainer import make_trainer
from transformers import AutoModelForCausalLM

from trl_laser import LaSeRConfig
from trl_laser.core import (
    between_group_gradient,
    group_centred_system,
    group_class_weights,
    least_squares_row_step,
    pairwise_logistic_loss,
    pairwise_loss_gradient,
)


# Rows of the conftest's fixed completions under `parity_reward`: group 0 holds rows 0-3, group 1 rows 4-7.
# Valid (finished) rows: 0 (wrong), 1 (right), 2 (right); 4 (right), 5 (wrong), 7 (wrong).
EXPECTED_GROUP_COEF = [1.5 / 6, 0.75 / 6, 0.75 / 6, 0.0, 1.5 / 6, 0.75 / 6, 0.0, 0.75 / 6]


def test_group_class_weights_by_hand():
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 9.0, 1.0, 1.0, 1.0, 1.0])
    valid = torch.tensor([True] * 7 + [False] + [True, True, True, False])
    coef, stats = group_class_weights(targets, valid, group_size=4)
    # group 0: 1 right, 3 wrong -> 4/2 = 2 and 4/6; group 1 (3 valid): 2 right, 1 wrong -> 3/4 and 3/2;
    # group 2: right only -> 3/6 = 1/2 each. N = 10 valid rows.
    expected = [2, 2 / 3, 2 / 3, 2 / 3, 3 / 4, 3 / 4, 3 / 2, 0, 1 / 2, 1 / 2, 1 / 2, 0]
    torch.testing.assert_close(coef, torch.tensor(expected) / 10)
    assert (stats["n_correct"], stats["n_incorrect"]) == (6, 4)
    assert stats["w_correct"] == pytest.approx((2 + 3 / 4 + 3 / 4 + 3 * 0.5) / 6)
    assert stats["w_incorrect"] == pytest.approx((3 * 2 / 3 + 3 / 2) / 4)


def test_group_class_weights_equal_the_batch_weights_for_one_group():
    from trl_laser.core import class_weights

    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    valid = torch.tensor([True, True, True, False, True])
    torch.testing.assert_close(group_class_weights(targets, valid, 5)[0], class_weights(targets, valid)[0])


def test_pair_loss_value_and_gradient_by_hand():
    scores = torch.tensor([0.9, 0.2, 0.5, 0.0, 0.3, 0.7, 0.1, 0.6], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    loss, n_pairs = pairwise_logistic_loss(scores, targets, valid, group_size=4)
    # group 0: right {0} vs wrong {1, 2} (row 3 is not valid); group 1: right {4, 5} vs wrong {6, 7}
    pairs = [(0, 1), (0, 2), (4, 6), (4, 7), (5, 6), (5, 7)]
    s = scores.detach().tolist()
    expected = sum(math.log(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs) / 6
    assert n_pairs == 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    gradient = [0.0] * 8
    for i, j in pairs:  # d softplus(-(s_i - s_j)) / d s_i = -sigmoid(-(s_i - s_j))
        g = 1 / (1 + math.exp(s[i] - s[j])) / 6
        gradient[i] -= g
        gradient[j] += g
    torch.testing.assert_close(scores.grad, torch.tensor(gradient))
    value, fixed_gradient, n = pairwise_loss_gradient(scores.detach(), targets, valid, 4)
    assert value == pytest.approx(expected, rel=1e-6) and n == 6
    torch.testing.assert_close(fixed_gradient, torch.tensor(gradient))


def test_between_group_gradient_by_hand():
    """Against autograd of the MSE written out as its within-group part plus the weighted between-group part, minus the
    pooled MSE's gradient. Group 1 has a row out of the MSE (weight 0, its score NaN); group 2 has no weight at all."""
    scores = [0.9, 0.2, 0.6, 0.1, 0.7, float("nan"), 0.3, 0.8, 0.5, 0.4]
    targets = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    coef = [0.3, 0.1, 0.2, 0.4, 0.25, 0.0, 0.15, 0.05, 0.0, 0.0]
    for between in (0.0, 0.3, 1.0):
        leaf = torch.tensor([0.0 if c == 0 else s for s, c in zip(scores, coef)], dtype=torch.float64)
        leaf.requires_grad_()
        pooled = within = outer = 0.0
        for g in range(5):
            rows = [i for i in range(2 * g, 2 * g + 2) if coef[i] > 0]
            if not rows:
                continue
            weight = sum(coef[i] for i in rows)
            mean = sum(coef[i] * (leaf[i] - targets[i]) for i in rows) / weight
            for i in rows:
                pooled = pooled + coef[i] * (leaf[i] - targets[i]) ** 2
                within = within + coef[i] * (leaf[i] - targets[i] - mean) ** 2
            outer = outer + weight * mean**2
        (g_pooled,) = torch.autograd.grad(pooled, leaf, retain_graph=True)
        (g_split,) = torch.autograd.grad(within + between * outer, leaf)
        assert float(pooled) == pytest.approx(float(within + outer))  # the split is exact
        got = between_group_gradient(torch.tensor(scores), torch.tensor(targets), torch.tensor(coef), 2, between)
        torch.testing.assert_close(got.double(), g_split - g_pooled, rtol=1e-6, atol=1e-7)
        assert not torch.isnan(got).any()
    assert (
        between_group_gradient(torch.tensor(scores), torch.tensor(targets), torch.tensor(coef), 2, 0.0).abs()[:5].min()
        > 1e-3
    )


def test_pair_loss_without_pairs_is_an_exact_zero():
    scores = torch.tensor([0.3, float("nan"), 0.1, 0.2])
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0])
    valid = torch.tensor([True, True, True, True])  # the NaN score (no score) takes part in no pair
    value, gradient, n_pairs = pairwise_loss_gradient(scores, targets, valid, 2)
    assert (value, n_pairs) == (0.0, 0)
    assert torch.equal(gradient, torch.zeros(4))


def test_group_centred_system_solves_the_centred_regression():
    """between_weight 0: the step is the weighted regression of group-centred residuals on group-centred states."""
    rng = np.random.default_rng(0)
    d, group_size, groups = 3, 5, 4
    phi = (
        rng.normal(size=(groups * group_size, d))
        + rng.normal(size=(groups, 1, d)).repeat(group_size, 0).reshape(-1, d) * 3
    )
    coef = rng.uniform(0.5, 2.0, size=groups * group_size)
    residual = rng.normal(size=groups * group_size)
    slot = np.repeat(np.arange(groups), group_size)

    def system(between_weight):
        t = torch.tensor
        sums = torch.zeros(groups, d, dtype=torch.float64).index_add_(0, t(slot), t(phi * coef[:, None]))
        weights = torch.zeros(groups, dtype=torch.float64).index_add_(0, t(slot), t(coef))
        residuals = torch.zeros(groups, dtype=torch.float64).index_add_(0, t(slot), t(coef * residual))
        return group_centred_system(
            t((coef * residual) @ phi), t((phi * coef[:, None]).T @ phi), sums, weights, residuals, between_weight
        )

    means = np.stack([np.average(phi[slot == g], axis=0, weights=coef[slot == g]) for g in range(groups)])
    mean_residual = np.array([np.average(residual[slot == g], weights=coef[slot == g]) for g in range(groups)])
    x, r = phi - means[slot], residual - mean_residual[slot]
    beta = 0.25
    gradient, gram = system(0.0)
    step = least_squares_row_step(gram, gradient, beta, ridge=1e-12).numpy()
    # the step w moves the score by beta * phi . w: it must cancel the centred residual in the weighted least squares
    root = np.sqrt(coef)[:, None]
    solution = np.linalg.lstsq(x * root, -r * root[:, 0], rcond=None)[0]
    np.testing.assert_allclose(beta * step, solution, rtol=1e-6, atol=1e-9)
    # between_weight 1: the pooled system, unchanged
    gradient, gram = system(1.0)
    np.testing.assert_allclose(gram.numpy(), (phi * coef[:, None]).T @ phi, rtol=1e-12)
    np.testing.assert_allclose(gradient.numpy(), (coef * residual) @ phi, rtol=1e-12)
    # in between: within-group part plus the weighted part between the group means
    gradient, gram = system(0.3)
    group_weight = np.array([coef[slot == g].sum() for g in range(groups)])
    between = (means * group_weight[:, None]).T @ means
    within = (x * coef[:, None]).T @ x
    np.testing.assert_allclose(gram.numpy(), within + 0.3 * between, rtol=1e-9)


@pytest.mark.parametrize(
    "field, value",
    [
        ("self_reward_row_between_weight", 1.5),
        ("self_reward_row_between_weight", 0.5),  # without the least-squares row update
        ("self_reward_class_weights", "problem"),
        ("self_reward_pair_loss_coef", -1.0),
        ("self_reward_pair_loss_coef", float("inf")),
        ("self_reward_mse_between_weight", -0.1),
        ("self_reward_mse_between_weight", 0.5),  # without the least-squares row update
    ],
)
def test_bad_setting_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        LaSeRConfig(output_dir=str(tmp_path), self_reward_token="<gh_stars>", bf16=False, **{field: value})


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(self_reward_balanced=False, self_reward_class_weights="group"), "self_reward_balanced"),
        (
            dict(
                self_reward_row_update="least_squares", self_reward_row_only=True, self_reward_mse_between_weight=0.0
            ),
            "self_reward_mse_between_weight.*self_reward_row_only",
        ),
    ],
    ids=["group-weights-need-the-balanced-mse", "mse-between-weight-needs-the-mse-in-the-model"],
)
def test_settings_that_contradict_each_other_name_both(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        LaSeRConfig(output_dir=str(tmp_path), self_reward_token="<gh_stars>", bf16=False, **settings)


def test_trainer_attaches_per_group_class_weights(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, self_reward_class_weights="group")
    force_completions(trainer)
    batches = capture_batches(trainer)
    trainer.train()
    torch.testing.assert_close(batches[0]["self_reward_coef"], torch.tensor(EXPECTED_GROUP_COEF))


def eos_ids(batch, row: int) -> torch.Tensor:
    """A finished row's prompt and completion up to its EOS, unpadded, as a batch of one."""
    prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
    return torch.cat([prompt, batch["completion_ids"][row, : batch["self_reward_index"][row]]])[None]


def eos_state(model, batch, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden state at a finished row's EOS and log pi(z_c) there, from a plain unpadded forward."""
    with torch.no_grad():
        h = model.model(input_ids=eos_ids(batch, row)).last_hidden_state[0, -1].double()
        return h, torch.log_softmax(model.lm_head(h.float()).double(), -1)[ZC]


def one_step(model_dir, path, **settings) -> tuple:
    """The trainer after one step on the fixed completions, its model's state before the step, and its batch."""
    trainer = make_trainer(model_dir, path, **settings)
    force_completions(trainer)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    batches = capture_batches(trainer)
    trainer.train()
    return trainer, snapshots.states[0], batches[0]


def test_pair_loss_moves_the_row_by_its_gradient(tiny_model_dir, tmp_path):
    """With SGD, the pair loss adds `-lr * coef * sum_i g_i * beta * (1 - p_i) h_i` to z_c's output row, with g the
    gradient of the pair loss at the scores of a plain forward (checked by hand); every other setting equal."""
    lr, coef, beta, ref = 0.05, 0.5, 0.1, -10.0
    common = dict(max_steps=1, learning_rate=lr, optim="sgd", max_grad_norm=0.0, self_reward_advantage_coef=0.0)
    rows, metrics = {}, {}
    for pair in (0.0, coef):
        trainer, state, batch = one_step(
            tiny_model_dir, tmp_path / str(pair), self_reward_pair_loss_coef=pair, **common
        )
        rows[pair] = trainer.model.lm_head.weight[ZC].detach().double() - state["lm_head.weight"][ZC]
        metrics[pair] = trainer.state.log_history[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(state)
    scores, features = [], []
    for row in range(8):
        index = batch["self_reward_index"][row].item()
        if index < 0:
            scores.append(0.0)
            features.append(torch.zeros(model.config.hidden_size, dtype=torch.float64))
            continue
        h, logp = eos_state(model, batch, row)
        scores.append(beta * (logp.item() - ref))
        features.append((1 - logp.exp()) * h)
    pairs = [(1, 0), (2, 0), (4, 5), (4, 7)]  # (right, wrong) within each group
    gradient = torch.zeros(8, dtype=torch.float64)
    for i, j in pairs:
        g = 1 / (1 + math.exp(scores[i] - scores[j])) / len(pairs)
        gradient[i] -= g
        gradient[j] += g
    expected = -lr * coef * beta * (gradient[:, None] * torch.stack(features)).sum(0)
    torch.testing.assert_close(rows[coef] - rows[0.0], expected, rtol=1e-3, atol=1e-8)
    assert expected.norm() > 1e-5
    loss = sum(math.log(1 + math.exp(-(scores[i] - scores[j]))) for i, j in pairs) / len(pairs)
    assert metrics[coef]["self_reward/pair_loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics[coef]["self_reward/pairs"] == 4
    # the pair term adds nothing to the logged loss: only its gradient acts
    assert metrics[coef]["loss"] == pytest.approx(metrics[0.0]["loss"], rel=1e-6)


def test_mse_between_weight_moves_the_model_by_its_gradient(tiny_model_dir, tmp_path):
    """With SGD, weighting the MSE's between-group part by 0.25 moves the final norm's weight by `-lr * sum_i g_i *
    d r_s_i / d theta` beyond the pooled run, with `g_i = -2 * 0.75 * c_i * m_g` from plain forwards (by hand); the row
    (least squares), the loss's value and the logged MSE stay the pooled run's."""
    lr, between, beta, loss_coef = 0.5, 0.25, 0.1, 0.1
    common = dict(LS, max_steps=1, learning_rate=lr, optim="sgd", max_grad_norm=0.0, self_reward_advantage_coef=0.0)
    params, rows, metrics = {}, {}, {}
    for weight in (1.0, between):
        trainer, state, batch = one_step(
            tiny_model_dir, tmp_path / str(weight), self_reward_mse_between_weight=weight, **common
        )
        params[weight] = trainer.model.model.norm.weight.detach().double().clone()
        rows[weight] = trainer.model.lm_head.weight[ZC].detach().clone()
        metrics[weight] = trainer.state.log_history[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(state)
    scores, coefs = {}, {}
    for row in range(8):
        if batch["self_reward_index"][row] < 0:
            continue
        logits = model(input_ids=eos_ids(batch, row)).logits[0, -1].double()  # with its graph, unlike eos_state
        scores[row] = beta * (torch.log_softmax(logits, -1)[ZC] - batch["self_reward_ref"][row].double())
        coefs[row] = batch["self_reward_coef"][row].item() * loss_coef
    surrogate = 0.0
    for group in (range(4), range(4, 8)):
        members = [i for i in group if i in scores and coefs[i] > 0]
        residuals = {i: scores[i].item() - batch["self_reward_target"][i].item() for i in members}
        mean = sum(coefs[i] * residuals[i] for i in members) / sum(coefs[i] for i in members)
        for i in members:
            surrogate = surrogate + (-2 * (1 - between) * coefs[i] * mean) * scores[i]
    (gradient,) = torch.autograd.grad(surrogate, model.model.norm.weight)
    expected = -lr * gradient.double()
    # atol: a few float32 ulps of weights near 1, by which the two runs' updates round apart
    torch.testing.assert_close(params[between] - params[1.0], expected, rtol=1e-3, atol=3e-7)
    assert (expected.abs() > 3e-6).sum() >= 8  # beyond the rounding, in most dimensions besides the constant one
    torch.testing.assert_close(rows[between], rows[1.0])
    assert metrics[between]["loss"] == pytest.approx(metrics[1.0]["loss"], rel=1e-6)
    assert metrics[between]["self_reward/mse"] == pytest.approx(metrics[1.0]["self_reward/mse"], rel=1e-6)


def test_within_group_row_step_by_hand(tiny_model_dir, tmp_path):
    """between_weight 0: z_c's row takes the damped step of the group-centred system, from plain forwards."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, **dict(LS, self_reward_row_between_weight=0.0))
    force_completions(trainer)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    batches = capture_batches(trainer)
    trainer.train()
    state, batch = snapshots.states[0], batches[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(state)
    beta = 0.1
    members = {0: [], 1: []}
    for row in range(8):
        index = batch["self_reward_index"][row].item()
        if index < 0:
            continue
        h, logp = eos_state(model, batch, row)
        c = batch["self_reward_coef"][row].double() * 0.1
        residual = beta * (logp - batch["self_reward_ref"][row].double()) - batch["self_reward_target"][row].double()
        members[row // 4].append((c, residual, (1 - logp.exp()) * h))
    d = model.config.hidden_size
    u, gram = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for group in members.values():
        total = sum(c for c, _, _ in group)
        mean_phi = sum(c * phi for c, _, phi in group) / total
        mean_residual = sum(c * r for c, r, _ in group) / total
        for c, r, phi in group:
            u += c * (r - mean_residual) * (phi - mean_phi)
            gram += c * torch.outer(phi - mean_phi, phi - mean_phi)
    ridge = LS["self_reward_row_ridge"]
    expected = -torch.linalg.solve(gram + ridge * torch.trace(gram) / d * torch.eye(d, dtype=gram.dtype), u) / beta
    row = trainer.model.lm_head.weight[ZC].detach().double() - state["lm_head.weight"][ZC].double()
    torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-6)
    assert expected.norm() > 1e-3


def test_levers_train_and_move_the_scores(tiny_model_dir, tmp_path):
    """All three levers together: the run trains, the row and the rest move, and the scores change."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2, **LEVERS)
    force_completions(trainer)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    after = trainer.model.state_dict()
    assert (after["lm_head.weight"][ZC] - before["lm_head.weight"][ZC]).norm() > 1e-3
    assert (after["model.layers.0.mlp.up_proj.weight"] - before["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0
    logged = [h for h in trainer.state.log_history if "self_reward/pair_loss" in h]
    assert len(logged) == 2 and logged[0]["self_reward/score_correct"] != logged[1]["self_reward/score_correct"]


def test_row_only_leaves_the_rest_of_the_model_to_grpo(tiny_model_dir, tmp_path):
    """`self_reward_row_only`: every parameter but z_c's row moves exactly as with no MSE at all, and the row takes
    the same least-squares step as with the MSE flowing into the model (the step reads only the states)."""
    common = dict(LS, max_steps=1, self_reward_advantage_coef=0.0)
    runs = {}
    for name, extra in {
        "row_only": dict(self_reward_row_only=True),
        "no_mse": dict(self_reward_loss_coef=0.0),
        "full": {},
    }.items():
        trainer = make_trainer(tiny_model_dir, tmp_path / name, **common, **extra)
        force_completions(trainer)
        before = copy.deepcopy(trainer.model.state_dict())
        trainer.train()
        runs[name] = (before, trainer.model.state_dict(), trainer.state.log_history[0])
    before, row_only, logged = runs["row_only"]
    others = torch.arange(row_only["lm_head.weight"].size(0)) != ZC
    for name, tensor in row_only.items():
        expected = runs["no_mse"][1][name]
        if name == "lm_head.weight":
            tensor, expected = tensor[others], expected[others]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7, msg=name)
    torch.testing.assert_close(row_only["lm_head.weight"][ZC], runs["full"][1]["lm_head.weight"][ZC])
    assert (row_only["lm_head.weight"][ZC] - before["lm_head.weight"][ZC]).norm() > 1e-3
    assert logged["self_reward/mse"] == pytest.approx(runs["full"][2]["self_reward/mse"])


def test_row_only_needs_the_least_squares_row(tmp_path):
    with pytest.raises(ValueError, match="self_reward_row_only"):
        LaSeRConfig(output_dir=str(tmp_path), self_reward_token="<gh_stars>", bf16=False, self_reward_row_only=True)


def test_row_only_keeps_the_pair_loss_in_the_model(tiny_model_dir, tmp_path):
    """With `self_reward_row_only`, the pair loss still trains the model: under SGD it moves every parameter but z_c's
    row by exactly what it adds when the MSE flows into the model too (the updates are linear in the gradients)."""
    common = dict(LS, max_steps=1, optim="sgd", learning_rate=0.05, max_grad_norm=0.0, self_reward_advantage_coef=0.0)
    after = {}
    for row_only in (True, False):
        for pair in (0.0, 0.5):
            name = f"{row_only}-{pair}"
            extra = dict(self_reward_row_only=row_only, self_reward_pair_loss_coef=pair)
            trainer = make_trainer(tiny_model_dir, tmp_path / name, **common, **extra)
            force_completions(trainer)
            trainer.train()
            after[row_only, pair] = trainer.model.state_dict()
    moved = 0.0
    for name, tensor in after[True, 0.5].items():
        by_pair = tensor.double() - after[True, 0.0][name].double()
        expected = after[False, 0.5][name].double() - after[False, 0.0][name].double()
        if name == "lm_head.weight":
            others = torch.arange(tensor.size(0)) != ZC
            by_pair, expected = by_pair[others], expected[others]
        # two float32 roundings of parameters near 1 (layer norms): 2.4e-7
        torch.testing.assert_close(by_pair, expected, rtol=0, atol=2.5e-7, msg=name)
        moved = max(moved, by_pair.abs().max().item())
    assert moved > 1e-5
