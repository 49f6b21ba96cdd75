"""Pure functions of LaSeR (`docs/method.md`): z_c's place, score, class weights, loss, advantage mix and phase.

They take no model and no trainer, so that every formula is tested against hand computations; the trainer only
wires them into TRL's data flow.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch


def append_self_reward_token(
    completion_ids: Sequence[Sequence[int]],
    tool_mask: Sequence[Sequence[int]] | None,
    logprobs: Sequence[Sequence[float]] | None,
    eos_token_ids: Sequence[int],
    token_id: int,
    mask_truncated: bool,
) -> tuple[list[list[int]], list[list[int]], list[list[float | None]] | None, list[bool]]:
    """z_c after every finished completion (its last id an EOS), for TRL's fused head to score it in the policy's
    forward: loss mask 0 there (and on truncated completions when `mask_truncated`), sampling log-prob None.

    Returns the new completion ids, loss masks, sampling log-probs, and which completions are finished.
    """
    eos = set(eos_token_ids)
    finished = [len(ids) > 0 and ids[-1] in eos for ids in completion_ids]
    new_ids, new_mask, new_logprobs = [], [], None if logprobs is None else []
    for i, (ids, done) in enumerate(zip(completion_ids, finished)):
        mask = list(tool_mask[i]) if tool_mask is not None else [1] * len(ids)
        if mask_truncated and not done:
            mask = [0] * len(ids)
        new_ids.append(list(ids) + [token_id] if done else list(ids))
        new_mask.append(mask + [0] if done else mask)
        if logprobs is not None:
            new_logprobs.append(list(logprobs[i]) + [None] if done else list(logprobs[i]))
    return new_ids, new_mask, new_logprobs, finished


class Phase(str, enum.Enum):
    """Training phase of the warm-up schedule."""

    REASONING = "reasoning"  # plain GRPO
    SELF_REWARD = "self_reward"  # GRPO + MSE term
    MIXED = "mixed"  # GRPO + MSE term + self-reward advantage mix


def laser_phase(step: int, reasoning_warmup_steps: int, self_reward_warmup_steps: int) -> Phase:
    """Phase at optimizer step `step` (0-based count of updates done so far).

    Steps `[0, w_r)` are plain GRPO, `[w_r, w_r + w_sr)` add the MSE term, and from `w_r + w_sr` on the advantage mix
    is on too.
    """
    if step < reasoning_warmup_steps:
        return Phase.REASONING
    if step < reasoning_warmup_steps + self_reward_warmup_steps:
        return Phase.SELF_REWARD
    return Phase.MIXED


def self_reward_score(logp: torch.Tensor, ref: torch.Tensor | float, beta: float) -> torch.Tensor:
    """`r_s = beta_v * (log pi(z_c | x, y, EOS) - c_ref)`."""
    return beta * (logp - ref)


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(log_p))` for `log_p <= 0`, stable at both ends (Maechler's two branches)."""
    return torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def logps_without_token(logps: torch.Tensor, label_logits: torch.Tensor, token_logits: torch.Tensor) -> torch.Tensor:
    """Each token's log-prob over the vocabulary without one token (z_c): `log p(y) - log(1 - p(z_c))`, the log-prob
    of a sampler that never draws z_c. The log-partition is `label_logits - logps`, so z_c's log-prob at the same
    position is `token_logits - (label_logits - logps)`; all logits are the ones the softmax saw (temperature
    included). Exact in value and gradient: the result does not depend on z_c's logit at all.
    """
    return logps - log1mexp((token_logits - (label_logits - logps)).clamp(max=0.0))


def class_weights(
    targets: torch.Tensor, valid: torch.Tensor, balanced: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-row coefficients of the class-balanced MSE over one whole generation batch.

    Args:
        targets: `(N,)` verifier rewards r_v in {0, 1} (any value where `valid` is False).
        valid: `(N,)` bool, True for finished completions with a verifier reward.
        balanced: if False, every valid row gets weight 1.

    Returns:
        `coef`, `(N,)`: `w(y) / (N_c + N_i)` for valid rows and 0 elsewhere, so that
        `sum(coef * (r_s - r_v) ** 2)` is the spec's `l_MSE`; and a dict with `n_correct`, `n_incorrect`,
        `w_correct`, `w_incorrect` (a class with no members gets weight 0).
    """
    valid = valid.bool()
    correct = valid & (targets > 0.5)
    incorrect = valid & ~(targets > 0.5)
    n_c = int(correct.sum())
    n_i = int(incorrect.sum())
    n = n_c + n_i
    if balanced:
        w_c = n / (2 * n_c) if n_c > 0 else 0.0
        w_i = n / (2 * n_i) if n_i > 0 else 0.0
    else:
        w_c = 1.0 if n_c > 0 else 0.0
        w_i = 1.0 if n_i > 0 else 0.0
    coef = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if n > 0:
        coef = coef.masked_fill(correct, w_c / n).masked_fill(incorrect, w_i / n)
    return coef, {"n_correct": n_c, "n_incorrect": n_i, "w_correct": w_c, "w_incorrect": w_i}


def group_class_weights(
    targets: torch.Tensor, valid: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """`class_weights` within each group (one prompt's completions), so that the MSE weighs right against wrong
    answers to the same problem rather than easy against hard problems (`self_reward_class_weights='group'`).

    In a group with `n_g` valid rows, `n_c` correct and `n_i` incorrect, a correct row weighs `n_g / (2 n_c)` and an
    incorrect one `n_g / (2 n_i)`; every coefficient is then divided by the batch's number of valid rows N, so that a
    batch whose groups all hold both classes has `sum(coef) = 1`, as `class_weights`. A one-class group weighs half a
    mixed one (`class_weights` of a one-class batch).

    Args:
        targets: `(N_rows,)` verifier rewards in {0, 1}, groups of `group_size` consecutive rows.
        valid: `(N_rows,)` bool, True for finished completions with a verifier reward.
        group_size: rows per group.

    Returns:
        `coef`, `(N_rows,)`, and the counts of `class_weights`, with `w_correct` / `w_incorrect` the mean weight of a
        correct / incorrect row (0 for a class with no members).
    """
    valid = valid.bool().view(-1, group_size)
    correct = valid & (targets.view(-1, group_size) > 0.5)
    incorrect = valid & ~correct
    n_c, n_i = correct.sum(1, keepdim=True).float(), incorrect.sum(1, keepdim=True).float()
    w_c = torch.where(n_c > 0, (n_c + n_i) / (2 * n_c.clamp(min=1)), 0.0)
    w_i = torch.where(n_i > 0, (n_c + n_i) / (2 * n_i.clamp(min=1)), 0.0)
    weights = torch.where(correct, w_c, 0.0) + torch.where(incorrect, w_i, 0.0)
    n = int(valid.sum())
    coef = (weights / max(n, 1)).view(-1).to(torch.float32)
    total_c, total_i = int(correct.sum()), int(incorrect.sum())
    stats = {
        "n_correct": total_c,
        "n_incorrect": total_i,
        "w_correct": float(weights[correct].mean()) if total_c else 0.0,
        "w_incorrect": float(weights[incorrect].mean()) if total_i else 0.0,
    }
    return coef, stats


def pairwise_logistic_loss(
    scores: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, int]:
    """The mean of `-log sigmoid(r_s(right) - r_s(wrong))` over every (right, wrong) pair of valid rows of one group.

    A Bradley-Terry loss inside each group (`self_reward_pair_loss_coef`): it only asks that a problem's right
    answers score above its wrong ones, which the per-sample MSE can lower instead by predicting the problem's
    success rate. Rows that are not valid take part in no pair; a batch with no pair gives an exact 0.

    Args:
        scores: `(N_rows,)` r_s (any value where `valid` is False).
        targets: `(N_rows,)` verifier rewards in {0, 1}, groups of `group_size` consecutive rows.
        valid: `(N_rows,)` bool.
        group_size: rows per group.

    Returns:
        The loss (a 0-dim tensor, differentiable in `scores`) and the number of pairs.
    """
    valid = valid.bool().view(-1, group_size)
    correct = valid & (targets.view(-1, group_size) > 0.5)
    incorrect = valid & ~correct
    pairs = correct[:, :, None] & incorrect[:, None, :]  # (groups, right, wrong)
    s = torch.where(valid, scores.view(-1, group_size), 0.0)
    margins = s[:, :, None] - s[:, None, :]
    n_pairs = int(pairs.sum())
    losses = torch.where(pairs, torch.nn.functional.softplus(-margins), 0.0)
    return losses.sum() / max(n_pairs, 1), n_pairs


def self_reward_loss(scores: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """`sum_i coef_i * (r_s_i - r_v_i) ** 2` over the rows with `coef_i != 0`.

    Summed over the micro-batches of a generation batch this is exactly `l_MSE` of the whole batch; rows with no
    weight (truncated, unverified, or a warm-up phase) contribute an exact zero and no NaN.
    """
    active = coef != 0
    diff = torch.where(active, scores - torch.where(active, targets, torch.zeros_like(targets)), 0.0)
    return (coef.to(scores.dtype) * diff.square()).sum()


def pairwise_loss_gradient(
    scores: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, group_size: int
) -> tuple[float, torch.Tensor, int]:
    """`pairwise_logistic_loss` at fixed scores, with its gradient in each score (0 for rows in no pair).

    The trainer adds `sum_i g_i * r_s_i` (with g this gradient) to the loss, so that the micro-batches of a generation
    batch, split and shuffled over steps and processes, together receive the exact gradient of the whole batch's pair
    loss at these scores. A NaN score (no score) takes part in no pair.
    """
    valid = valid.bool() & ~torch.isnan(scores)
    leaf = torch.where(valid, scores.detach().double(), 0.0).requires_grad_()
    with torch.enable_grad():
        loss, n_pairs = pairwise_logistic_loss(leaf, targets, valid, group_size)
        (gradient,) = torch.autograd.grad(loss, leaf)
    return loss.item(), gradient.to(torch.float32), n_pairs


def between_group_gradient(
    scores: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, group_size: int, between_weight: float
) -> torch.Tensor:
    """What to add, in each score, to the gradient of `self_reward_loss` so that it becomes the gradient of the MSE's
    part within groups plus `between_weight` times its part between groups, at fixed scores.

    With residuals `r_i = r_s_i - r_v_i`, a group's weight `C_g = sum_g c_i` and weighted mean residual `m_g`, the
    weighted MSE splits exactly: `sum_i c_i r_i^2 = sum_g sum_{i in g} c_i (r_i - m_g)^2 + sum_g C_g m_g^2`. The
    pooled gradient in score i is `2 c_i r_i`; with the between part weighted, `2 c_i (r_i - (1 - between_weight)
    m_g)`. The part between groups is what the MSE lowers by predicting how often each problem is solved; weighted
    down, the MSE's gradient into the model asks mostly what separates one problem's answers
    (`self_reward_mse_between_weight`). The trainer adds `sum_i g_i * r_s_i` to the loss, as for the pair loss.

    Args:
        scores: `(N_rows,)` r_s (any value where `coef` is 0).
        targets: `(N_rows,)` verifier rewards, groups of `group_size` consecutive rows.
        coef: `(N_rows,)` the MSE's weights, as `self_reward_loss` takes them (0: not in the MSE).
        group_size: rows per group.
        between_weight: the weight of the part between groups, in [0, 1] (1: the pooled MSE, a zero correction).

    Returns:
        `(N_rows,)` float32, `-2 (1 - between_weight) c_i m_g` (0 where `c_i` is 0).
    """
    coef = coef.double().view(-1, group_size)
    residual = torch.where(
        coef != 0, scores.double().view(-1, group_size) - targets.double().view(-1, group_size), 0.0
    )
    total = coef.sum(1, keepdim=True)
    mean = (coef * residual).sum(1, keepdim=True) / torch.where(total > 0, total, 1.0)
    return (-2 * (1 - between_weight) * coef * mean).view(-1).to(torch.float32)


# TRL 1.16's `scale_rewards` (after `GRPOConfig` maps True/False) and `multi_objective_aggregation` values.
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def self_reward_advantages(
    s: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """A_s: the advantage TRL would give `s` if it were the only reward, so that A_s and A_v are on one scale.

    With `"sum_then_normalize"` (TRL's default) A_s is `s` minus its group mean, divided by the group's std
    (`scale_rewards="group"`, the paper's formula), by the std over the whole batch (`"batch"`), or not divided
    (`"none"`). With `"normalize_then_sum"` it is `s` standardised within its group, then standardised over the
    batch. Stds are unbiased, as TRL's; TRL's `1e-4` is left out (the mix's filter keeps groups whose std is above
    its threshold), and a group or batch with std 0 gives 0 where TRL's formula gives 0 too.

    Args:
        s: `(N,)` clamped scores, groups of `num_generations` consecutive rows.
        num_generations: group size.
        scale_rewards: `"group"`, `"batch"` or `"none"`.
        aggregation: `"sum_then_normalize"` or `"normalize_then_sum"`.

    Returns:
        `(N,)` float tensor.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`multi_objective_aggregation` must be one of {list(AGGREGATIONS)}, got {aggregation!r}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards` must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}.")
    grouped = s.float().view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])

    def divide(x: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return torch.where(std > 0, x / torch.where(std > 0, std, 1.0), 0.0)

    if aggregation == "normalize_then_sum":
        z = divide(centred, group_std).view(-1)
        batch_std = z.std() if z.numel() > 1 else z.new_zeros(())
        return divide(z - z.mean(), batch_std)
    if scale_rewards == "group":
        return divide(centred, group_std).view(-1)
    if scale_rewards == "batch":
        batch_std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        return divide(centred, batch_std).view(-1)
    return centred.view(-1)


def mixed_advantages(
    verifier_advantages: torch.Tensor,
    scores: torch.Tensor,
    finished: torch.Tensor,
    num_generations: int,
    tau: float,
    std_threshold: float,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`A = (1 - tau) * A_v + tau * A_s`, with the spec's clamp and group filter.

    Args:
        verifier_advantages: `(N,)` GRPO advantages A_v, groups of `num_generations` consecutive rows.
        scores: `(N,)` generation-time self-reward scores r_s (any value for unfinished rows).
        finished: `(N,)` bool, False for truncated completions, whose s is 0.
        num_generations: group size.
        tau: advantage-mix coefficient.
        std_threshold: groups whose std of s is `<=` this use `A_s := A_v`.
        scale_rewards, aggregation: TRL's settings that A_v was computed with; A_s is scaled the same way
            (`self_reward_advantages`). The defaults are the paper's group standardisation.

    Returns:
        The mixed advantages `(N,)` and a `(N / num_generations,)` bool tensor, True for groups whose A_s was used.
    """
    s = torch.where(finished.bool(), scores.float().clamp(0.0, 1.0), 0.0)
    a_v = verifier_advantages.float().view(-1, num_generations)
    grouped = s.view(-1, num_generations)
    std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
    used = std > std_threshold
    a_s = self_reward_advantages(s, num_generations, scale_rewards, aggregation).view(-1, num_generations)
    mixed = (1.0 - tau) * a_v + tau * torch.where(used, a_s, a_v)
    return mixed.view(-1).to(verifier_advantages.dtype), used.view(-1)


def least_squares_row_step(gram: torch.Tensor, gradient: torch.Tensor, beta: float, ridge: float) -> torch.Tensor:
    """The damped Gauss-Newton step of z_c's output row w on LaSeR's MSE: `-(gram + lambda I)^-1 gradient / beta`.

    With `phi_i = (1 - p_i) h_i` the Jacobian of `log pi(z_c)` in w (h_i the final hidden state at the EOS, p_i the
    probability of z_c), the MSE `alpha * sum_i c_i (r_s_i - r_v_i) ** 2` has the gradient `2 alpha beta u` and the
    Gauss-Newton matrix `2 alpha beta ** 2 B`, where `u = sum_i c_i (r_s_i - r_v_i) phi_i` (`gradient`) and
    `B = sum_i c_i phi_i phi_i^T`. `gram` is B, or a running sum of B over steps (recursive least squares); alpha
    cancels. `lambda = ridge * trace(gram) / d` keeps the damping relative to the scale of the hidden states.
    """
    d = gram.size(0)
    damping = ridge * torch.trace(gram) / d
    system = gram.double() + damping.double() * torch.eye(d, dtype=torch.float64, device=gram.device)
    return -(torch.linalg.solve(system, gradient.double()) / beta).to(gradient.dtype)


def group_centred_system(
    gradient: torch.Tensor,
    gram: torch.Tensor,
    group_sums: torch.Tensor,
    group_weights: torch.Tensor,
    group_residuals: torch.Tensor,
    between_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares system of z_c's row with the part between groups weighted by `between_weight`.

    With `m_g` the weighted mean of `phi` in group g and `rbar_g` that of the residual, `B = sum_i c_i phi_i phi_i^T`
    splits into the within-group part `sum_i c_i (phi_i - m_g)(phi_i - m_g)^T` and the between-group part
    `sum_g C_g m_g m_g^T` (`C_g = sum_{i in g} c_i`), and `u` likewise. Weighting the between part by
    `between_weight` gives the system of the regression of group-centred residuals on group-centred states (0: the row
    learns only what separates answers to the same problem) plus that weight times the regression of the group means
    (1: the pooled system, unchanged).

    Args:
        gradient, gram: `u` and `B` of `least_squares_row_step`, summed over every row.
        group_sums: `(G, d)`, `sum_{i in g} c_i phi_i`.
        group_weights: `(G,)`, `C_g`.
        group_residuals: `(G,)`, `sum_{i in g} c_i (r_s_i - r_v_i)`.
        between_weight: in [0, 1].

    Returns:
        The gradient and the matrix to hand to `least_squares_row_step`.
    """
    present = group_weights > 0
    sums, weights = group_sums[present].double(), group_weights[present].double()
    between_gram = sums.T @ (sums / weights[:, None])
    between_gradient = (group_residuals[present].double() / weights) @ sums
    cut = 1.0 - between_weight
    return (
        (gradient.double() - cut * between_gradient).to(gradient.dtype),
        (gram.double() - cut * between_gram).to(gram.dtype),
    )
