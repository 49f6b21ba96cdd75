"""The ceiling of what training z_c's output row can reach: a linear read-out (L2-regularised logistic regression) of
the final hidden state at the EOS position, cross-validated with folds grouped by problem.

A read-out validated on other samples of a problem it was trained on would be credited for recognising the problem:
every fold holds whole problems, and the regularisation is chosen on the training folds only. Pure functions of
features, labels and problem ids.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Hashable, Sequence

import torch


# Inverse L2 strengths tried for the read-out (scikit-learn's C on standardised features): from a read-out that can
# only use a few strong directions to one that can fit any of the hidden size's. The best is chosen per outer fold by
# the balanced log-loss of an inner grouped split of its training part, so the reported AUROC never sees the samples
# that chose C. (On SmolLM2-135M-Instruct's 576-wide EOS states with ~400 training samples the choice is 0.003.)
DEFAULT_C_VALUES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def grouped_folds(
    groups: Sequence[Hashable], num_folds: int, seed: int = 0, labels: Sequence[bool | int] | None = None
) -> list[int]:
    """The fold of each sample, all samples of a group (a problem) in the same fold; stratified when `labels` given.

    A read-out validated on other samples of a problem it was trained on would be credited for recognising the
    problem. Groups are shuffled with `seed`, sorted by their fraction of correct samples when `labels` are given
    (a stable sort: random order among equals), and dealt in consecutive blocks of `num_folds`, each block to the
    folds in a random order. So every fold has the same number of groups give or take one, and, stratified, about
    the same share of correct samples: pooled out-of-fold AUROCs are biased low when the folds' class balance
    differs (a read-out trained on fewer correct samples than its test fold has scores that fold lower).
    """
    unique = list(dict.fromkeys(groups))
    if num_folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 folds, got {num_folds}.")
    if len(unique) < num_folds:
        raise ValueError(f"{len(unique)} problems cannot fill {num_folds} folds grouped by problem: use fewer folds.")
    rng = random.Random(seed)
    rng.shuffle(unique)
    if labels is not None:
        if len(labels) != len(groups):
            raise ValueError(f"Got {len(groups)} groups but {len(labels)} labels.")
        correct = collections.Counter(g for g, y in zip(groups, labels) if y)
        size = collections.Counter(groups)
        unique.sort(key=lambda g: correct[g] / size[g])
    fold_of = {}
    for start in range(0, len(unique), num_folds):
        block = unique[start : start + num_folds]
        for group, fold in zip(block, rng.sample(range(num_folds), len(block))):
            fold_of[group] = fold
    return [fold_of[group] for group in groups]


@dataclasses.dataclass
class LinearReadout:
    """A fitted logistic regression on standardised features: p(correct | h) = sigmoid(((h - mean) / scale) . w + b)."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """p(correct) of each row of `features`."""
        z = (features.to(torch.float64) - self.mean) / self.scale
        return torch.sigmoid(z @ self.weight + self.bias)


def fit_logistic(
    features: torch.Tensor, labels: Sequence[bool | int], c: float, balanced: bool = True, max_iter: int = 500
) -> LinearReadout:
    """L2-regularised logistic regression: minimises mean(v_i * log-loss_i) + ||w||^2 / (2 C n), bias not penalised.

    With `balanced`, v_i are LaSeR's class weights (`(N_c + N_i) / (2 N_c)` for correct samples, `(N_c + N_i) /
    (2 N_i)` for incorrect ones), so that p > 0.5 is the balanced decision the paper's F1 scores, as LaSeR's
    class-balanced MSE makes r_s > 0.5 one; otherwise v_i = 1. That is scikit-learn's `LogisticRegression(C=c,
    class_weight="balanced")` objective divided by C n. Features are standardised with the training data's mean and
    std (so C means the same for any hidden size and scale); full-batch L-BFGS in float64.
    """
    y = torch.tensor([float(bool(v)) for v in labels], dtype=torch.float64)
    if len(y) != len(features):
        raise ValueError(f"Got {len(features)} feature rows but {len(y)} labels.")
    if not 0 < y.mean() < 1:
        raise ValueError("A logistic read-out needs both classes among its training samples.")
    if not c > 0:
        raise ValueError(f"The inverse regularisation strength C must be > 0, got {c}.")
    x = features.detach().to(torch.float64).clone()  # a plain tensor, also when made under inference mode
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    n_correct = float(y.sum())
    if balanced:
        sample_weight = torch.where(y > 0, len(y) / (2 * n_correct), len(y) / (2 * (len(y) - n_correct)))
        start_bias = 0.0
    else:
        sample_weight = torch.ones_like(y)
        start_bias = math.log(n_correct / (len(y) - n_correct))
    weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(start_bias, dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (2 * c * len(y))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y, weight=sample_weight)
        loss = loss + penalty * weight.dot(weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearReadout(mean=mean, scale=scale, weight=weight.detach(), bias=float(bias.detach()))


def _fit_predict(x: torch.Tensor, y: list[int], test: torch.Tensor, c: float) -> list[float]:
    """Probabilities for `test` from a read-out fitted on (x, y); a single-class training part predicts its class."""
    if len(set(y)) < 2:
        return [float(y[0])] * len(test)
    return fit_logistic(x, y, c).probabilities(test).tolist()


def _cross_validate(x: torch.Tensor, y: list[int], folds: list[int], c: float) -> list[float]:
    probs = [0.0] * len(y)
    for k in sorted(set(folds)):
        train = [i for i, f in enumerate(folds) if f != k]
        test = [i for i, f in enumerate(folds) if f == k]
        for i, p in zip(test, _fit_predict(x[train], [y[i] for i in train], x[test], c)):
            probs[i] = p
    return probs


def _balanced_log_loss(probs: Sequence[float], labels: Sequence[int]) -> float:
    """Mean log-loss with LaSeR's class weights (the read-out's own objective, without the penalty)."""
    n, n_correct = len(labels), sum(labels)
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(p, 1e-12), 1 - 1e-12)
        total += -math.log(p) * n / (2 * n_correct) if y else -math.log(1 - p) * n / (2 * (n - n_correct))
    return total / n


def _choose_c(
    x: torch.Tensor, y: list[int], groups: list[Hashable], num_folds: int, c_values: Sequence[float], seed: int
) -> float:
    """The C with the lowest out-of-fold balanced log-loss of an inner grouped split (ties: stronger regularisation).

    Log-loss, a proper score, picks C more steadily than the AUROC of a few hundred samples does.
    """
    candidates = sorted(c_values)
    unique = len(set(groups))
    if len(candidates) == 1 or unique < 2 or len(set(y)) < 2:
        return candidates[0]
    inner = grouped_folds(groups, min(max(2, num_folds - 1), unique), seed + 1, y)
    losses = [_balanced_log_loss(_cross_validate(x, y, inner, c), y) for c in candidates]
    return candidates[losses.index(min(losses))]


def readout_probabilities(
    features: torch.Tensor,
    labels: Sequence[bool | int],
    groups: Sequence[Hashable],
    num_folds: int = 5,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Out-of-fold p(correct) of every sample from a linear read-out of `features`, folds grouped by `groups`.

    Each sample's probability comes from a read-out that saw no sample of its group, with C chosen on the training
    folds only (`DEFAULT_C_VALUES`); folds are stratified by correctness (`grouped_folds`). Returns the probabilities
    and the C chosen for each fold.
    """
    y = [int(bool(v)) for v in labels]
    if not len(y) == len(features) == len(groups):
        raise ValueError(f"Got {len(features)} feature rows, {len(y)} labels and {len(groups)} groups.")
    if not c_values or any(not c > 0 for c in c_values):
        raise ValueError(f"The read-out's C values must be > 0, got {list(c_values)}.")
    folds = grouped_folds(groups, num_folds, seed, y)
    probs = [0.0] * len(y)
    chosen = []
    for k in range(num_folds):
        train = [i for i, f in enumerate(folds) if f != k]
        test = [i for i, f in enumerate(folds) if f == k]
        y_train = [y[i] for i in train]
        c = _choose_c(features[train], y_train, [groups[i] for i in train], num_folds, c_values, seed)
        for i, p in zip(test, _fit_predict(features[train], y_train, features[test], c)):
            probs[i] = p
        chosen.append(c)
    return probs, chosen
