"""LaSeR's formulas against hand computations (no model)."""

import math

import pytest
import torch

from trl_laser.core import (
    Phase,
    append_self_reward_token,
    class_weights,
    laser_phase,
    mixed_advantages,
    self_reward_advantages,
    self_reward_loss,
    self_reward_score,
)


def test_score_is_scaled_shifted_logprob():
    logp = torch.tensor([-23.0, -13.0, -33.0])
    assert torch.allclose(self_reward_score(logp, -23.0, 0.1), torch.tensor([0.0, 1.0, -1.0]))
    per_row_ref = torch.tensor([-20.0, -20.0, -30.0])
    assert torch.allclose(self_reward_score(logp, per_row_ref, 0.5), torch.tensor([-1.5, 3.5, -1.5]))


def test_class_weights_balanced():
    # 1 correct, 3 incorrect: N = 4, w_c = 4 / 2 = 2, w_i = 4 / 6 = 2/3; coef = w / N.
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0])
    coef, stats = class_weights(targets, torch.ones(4, dtype=torch.bool))
    assert stats == {"n_correct": 1, "n_incorrect": 3, "w_correct": 2.0, "w_incorrect": pytest.approx(2 / 3)}
    assert torch.allclose(coef, torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]))
    # The weights put half the total mass on each class.
    assert coef[targets == 1].sum().item() == pytest.approx(0.5)
    assert coef[targets == 0].sum().item() == pytest.approx(0.5)


def test_class_weights_ignore_invalid_rows():
    # Row 4 is truncated and row 5 has no verifier reward: neither counts in N_c, N_i nor gets weight.
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    valid = torch.tensor([True, True, True, True, False, False])
    coef, stats = class_weights(targets, valid)
    assert (stats["n_correct"], stats["n_incorrect"]) == (2, 2)
    assert torch.allclose(coef, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0, 0.0]))


def test_class_weights_empty_class_gets_zero():
    coef, stats = class_weights(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, True, False]))
    # N = 2, w_c = 2 / 4 = 0.5, no incorrect sample: w_i = 0.
    assert stats["w_correct"] == 0.5 and stats["w_incorrect"] == 0.0
    assert torch.allclose(coef, torch.tensor([0.25, 0.25, 0.0]))
    coef, stats = class_weights(torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.bool))
    assert stats == {"n_correct": 0, "n_incorrect": 0, "w_correct": 0.0, "w_incorrect": 0.0}
    assert coef.abs().sum() == 0


def test_class_weights_unbalanced():
    coef, stats = class_weights(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.ones(4, dtype=torch.bool), balanced=False)
    assert stats["w_correct"] == 1.0 and stats["w_incorrect"] == 1.0
    assert torch.allclose(coef, torch.full((4,), 0.25))


def test_mse_normalisation_by_hand():
    scores = torch.tensor([0.9, 0.2, 0.1, 0.3, 5.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0, float("nan")])  # row 5: truncated, no target
    coef, _ = class_weights(torch.nan_to_num(targets), torch.tensor([True, True, True, True, False]))
    # w_c = 2, w_i = 2/3, N = 4: (2 * 0.01 + 2/3 * (0.04 + 0.01 + 0.09)) / 4
    expected = (2 * 0.01 + (2 / 3) * 0.14) / 4
    assert self_reward_loss(scores, targets, coef).item() == pytest.approx(expected, rel=1e-6)


def test_mse_gradient_is_independent_of_micro_batch_split():
    torch.manual_seed(0)
    logp = torch.randn(12, dtype=torch.float64) * 2 - 20
    targets = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float64)
    valid = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    coef, stats = class_weights(targets, valid)
    coef = coef.double()

    def grad_of(splits):
        x = logp.clone().requires_grad_(True)
        total = sum(self_reward_loss(self_reward_score(x[s], -20.0, 0.1), targets[s], coef[s]) for s in splits)
        total.backward()
        return x.grad

    # Independent computation of the spec's formula and its gradient, written out directly.
    n_c, n_i = stats["n_correct"], stats["n_incorrect"]
    x = logp.clone().requires_grad_(True)
    r_s = 0.1 * (x + 20.0)
    w = torch.where(targets == 1, (n_c + n_i) / (2 * n_c), (n_c + n_i) / (2 * n_i))
    reference = (w * (r_s - targets) ** 2)[valid].sum() / (n_c + n_i)
    reference.backward()

    whole = grad_of([slice(0, 12)])
    halves = grad_of([slice(0, 6), slice(6, 12)])
    uneven = grad_of([slice(0, 1), slice(1, 5), slice(5, 12)])
    assert torch.allclose(whole, x.grad) and torch.allclose(halves, x.grad) and torch.allclose(uneven, x.grad)
    assert x.grad[~valid].abs().sum() == 0


def test_mixed_advantages_by_hand():
    # Two groups of 4. Group 1: scores spread out; group 2: all scores equal -> filtered (A_s := A_v).
    a_v = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 0.5, -0.5])
    scores = torch.tensor([1.4, 0.2, 0.6, -0.3, 0.7, 0.7, 0.7, 0.7])
    finished = torch.tensor([True, True, True, False, True, True, True, True])
    mixed, used = mixed_advantages(a_v, scores, finished, num_generations=4, tau=0.1, std_threshold=0.1)
    # s = clamp(r_s, 0, 1), truncated -> 0: [1, 0.2, 0.6, 0]; mean 0.45; unbiased std.
    s = [1.0, 0.2, 0.6, 0.0]
    mean = sum(s) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in s) / 3)
    expected_1 = [0.9 * a + 0.1 * (v - mean) / std for a, v in zip([1.0, -1.0, 1.0, -1.0], s)]
    assert torch.allclose(mixed[:4], torch.tensor(expected_1), atol=1e-6)
    assert torch.allclose(mixed[4:], a_v[4:])
    assert used.tolist() == [True, False]


def test_mixed_advantages_filter_threshold_boundary():
    a_v = torch.tensor([1.0, -1.0])
    # s = [0.2, 0.0]: unbiased std = 0.1414 > 0.1 -> used; with threshold 0.15 -> filtered.
    scores = torch.tensor([0.2, -5.0])
    finished = torch.tensor([True, True])
    _, used = mixed_advantages(a_v, scores, finished, 2, tau=0.5, std_threshold=0.1)
    assert used.tolist() == [True]
    mixed, used = mixed_advantages(a_v, scores, finished, 2, tau=0.5, std_threshold=0.15)
    assert used.tolist() == [False] and torch.equal(mixed, a_v)
    mixed, _ = mixed_advantages(a_v, scores, finished, 2, tau=0.0, std_threshold=0.1)
    assert torch.equal(mixed, a_v)


@pytest.mark.parametrize(
    "step, expected",
    [(0, Phase.REASONING), (2, Phase.REASONING), (3, Phase.SELF_REWARD), (4, Phase.SELF_REWARD), (5, Phase.MIXED)],
)
def test_warmup_boundaries(step, expected):
    assert laser_phase(step, reasoning_warmup_steps=3, self_reward_warmup_steps=2) == expected


def test_warmup_zero_means_mixed_from_the_start():
    assert laser_phase(0, 0, 0) == Phase.MIXED
    assert laser_phase(0, 0, 1) == Phase.SELF_REWARD and laser_phase(1, 0, 1) == Phase.MIXED


# Three groups of 4 clamped scores s: spread out, spread out, flat (std 0 <= threshold: filtered, A_s := A_v).
S_GROUPS = [[1.0, 0.2, 0.6, 0.0], [0.9, 0.9, 0.1, 0.1], [0.3, 0.3, 0.3, 0.3]]


def _mean(values):
    return sum(values) / len(values)


def _std(values):  # unbiased, as torch and TRL
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _hand_self_reward_advantages(scale_rewards, aggregation):
    """TRL's advantage formulas written out for s as the only reward (no 1e-4; std 0 gives 0)."""
    centred = [[v - _mean(g) for v in g] for g in S_GROUPS]
    flat = [v for g in S_GROUPS for v in g]
    if aggregation == "normalize_then_sum":
        z = [v / _std(g) if _std(g) > 0 else 0.0 for g, c in zip(S_GROUPS, centred) for v in c]
        return [(v - _mean(z)) / _std(z) for v in z]
    if scale_rewards == "group":
        return [v / _std(g) if _std(g) > 0 else 0.0 for g, c in zip(S_GROUPS, centred) for v in c]
    if scale_rewards == "batch":
        return [v / _std(flat) for c in centred for v in c]
    return [v for c in centred for v in c]


@pytest.mark.parametrize(
    "scale_rewards, aggregation, first_group",
    [
        # group: (s - 0.45) / 0.443471 (0.443471 = sqrt(0.59 / 3))
        ("group", "sum_then_normalize", [1.240216, -0.563735, 0.338241, -1.014722]),
        # batch: (s - 0.45) / 0.345972, the std of all 12 s (sum of squares 1.316667 / 11)
        ("batch", "sum_then_normalize", [1.589722, -0.722601, 0.433560, -1.300681]),
        # none: s - 0.45
        ("none", "sum_then_normalize", [0.55, -0.25, 0.15, -0.45]),
        # group z-scores (the flat group's are 0), then over the batch: sum of z^2 = 3 + 3, std sqrt(6 / 11)
        ("group", "normalize_then_sum", [1.679260, -0.763300, 0.457980, -1.373940]),
        ("none", "normalize_then_sum", [1.679260, -0.763300, 0.457980, -1.373940]),  # scale_rewards has no say
    ],
)
def test_self_reward_advantage_is_scaled_as_trl_scales_a_v(scale_rewards, aggregation, first_group):
    s = torch.tensor([v for g in S_GROUPS for v in g])
    a_s = self_reward_advantages(s, 4, scale_rewards, aggregation)
    expected = _hand_self_reward_advantages(scale_rewards, aggregation)
    assert torch.allclose(a_s, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(a_s[:4], torch.tensor(first_group), atol=1e-5)

    # In the mix, the flat group is filtered (A_s := A_v) and the others take this A_s.
    a_v = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.8, 0.8, -0.8, -0.8, 0.2, -0.2, 0.2, -0.2])
    finished = torch.ones(12, dtype=torch.bool)
    mixed, used = mixed_advantages(a_v, s, finished, 4, 0.1, 0.1, scale_rewards, aggregation)
    a_s_used = expected[:8] + a_v[8:].tolist()
    assert torch.allclose(mixed, torch.tensor([0.9 * a + 0.1 * b for a, b in zip(a_v.tolist(), a_s_used)]), atol=1e-6)
    assert used.tolist() == [True, True, False]


def test_self_reward_advantage_refuses_unknown_settings():
    with pytest.raises(ValueError, match="`scale_rewards`"):
        self_reward_advantages(torch.zeros(4), 4, "per_token")
    with pytest.raises(ValueError, match="`multi_objective_aggregation`"):
        self_reward_advantages(torch.zeros(4), 4, "group", "sum")


def test_append_self_reward_token_by_hand():
    # EOS is 2, z_c is 9: rows finished, truncated, empty; the second row's tool mask hides its first id.
    ids, mask, logprobs, finished = append_self_reward_token(
        [[5, 2], [4, 6], []],
        [[1, 1], [0, 1], []],
        [[-0.5, -0.1], [-1.0, -2.0], []],
        eos_token_ids=[2],
        token_id=9,
        mask_truncated=False,
    )
    assert ids == [[5, 2, 9], [4, 6], []] and finished == [True, False, False]
    assert mask == [[1, 1, 0], [0, 1], []]
    assert logprobs == [[-0.5, -0.1, None], [-1.0, -2.0], []]
    ids, mask, logprobs, _ = append_self_reward_token([[5, 2], [4, 6]], None, None, [2], 9, mask_truncated=True)
    assert mask == [[1, 1, 0], [0, 0]] and logprobs is None
